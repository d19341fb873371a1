#!/usr/bin/env bash
# The benchmark suite: dlsessiond against curl, wget2 and aria2c on loopback, plus its own
# costs. Installs what is missing, builds release binaries, runs target/release/dlsession-bench
# with the arguments given (see BENCHMARKS.md, or `scripts/bench.sh --help`).
#
#   scripts/bench.sh                # full run: writes BENCHMARKS.md
#   scripts/bench.sh --quick        # smoke run (3 runs, smaller sizes): target/bench-results.md
#   scripts/bench.sh --only ipc     # one workload
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
command -v wget2 >/dev/null || need+=(wget2)
command -v aria2c >/dev/null || need+=(aria2)
[ -x /usr/bin/time ] || need+=(time)
# The activation workload plays the service manager with it.
command -v systemd-socket-activate >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}"
fi

cargo build --release -p dlsessiond -p dlsessionctl -p dlsession-bench

export DLSESSION_BENCH_COMMAND="scripts/bench.sh${*:+ $*}"
exec target/release/dlsession-bench "$@"
