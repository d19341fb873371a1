#!/usr/bin/env bash
# The long profile, for local runs (CI runs the quick one in .ci/run):
#   - the workspace tests,
#   - the protocol property tests with many more cases,
#   - the crash loop with CRASH_KILLS kills (default 200) for CRASH_SEEDS seeds,
#   - the frame/message fuzzer for FUZZ_SECONDS (default 600; needs a nightly toolchain
#     and `cargo install cargo-fuzz`), seeded from the golden wire samples.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzz_seconds=${FUZZ_SECONDS:-600}

cargo test --workspace --locked
PROPTEST_CASES=${PROPTEST_CASES:-20000} cargo test --locked -p dlsession-proto --test decoder_props --test roundtrip_props
for seed in ${CRASH_SEEDS:-1 2 3}; do
    DLSESSION_CRASH_SEED=$seed DLSESSION_CRASH_KILLS=${CRASH_KILLS:-200} \
        cargo test --locked -p dlsession-e2e --test crash_loop -- --nocapture
done

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "skipping the fuzzer: needs 'rustup toolchain install nightly' and 'cargo install cargo-fuzz'" >&2
    exit 0
fi
mkdir -p fuzz/corpus/frames
for hex in proto/tests/golden/v*/*.hex; do
    xxd -r -p "$hex" >"fuzz/corpus/frames/$(basename "$(dirname "$hex")")-$(basename "$hex" .hex)"
done
(cd fuzz && cargo +nightly fuzz run frames -- -max_total_time="$fuzz_seconds" -max_len=4096 -print_final_stats=1)
