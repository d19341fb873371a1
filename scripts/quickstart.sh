#!/usr/bin/env bash
# Builds dlsessiond and dlsessionctl, starts the daemon in the background if none is
# running, and downloads one file with `dlsessionctl get --wait`.
#
#   ./scripts/quickstart.sh [URL] [OUTPUT]
#
# The default URL is a crate archive from static.crates.io (reachable wherever cargo is).
set -euo pipefail
cd "$(dirname "$0")/.."

url=${1:-https://static.crates.io/crates/serde/serde-1.0.229.crate}
out=${2:-$PWD/$(basename "${url%%\?*}")}

cargo build --release --locked -p dlsessiond -p dlsessionctl
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

if ! "$bin/dlsessionctl" status >/dev/null 2>&1; then
    log=${XDG_STATE_HOME:-$HOME/.local/state}/dlsessiond/dlsessiond.log
    mkdir -p "$(dirname "$log")"
    echo "starting dlsessiond in the background (log: $log)"
    nohup "$bin/dlsessiond" >>"$log" 2>&1 &
    for _ in $(seq 100); do
        "$bin/dlsessionctl" status >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

"$bin/dlsessionctl" get "$url" -o "$out" --overwrite --wait
sha256sum "$out"
