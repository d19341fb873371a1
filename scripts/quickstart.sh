#!/usr/bin/env bash
# Builds dlsessiond and dlsessionctl, starts the daemon in the background if none is
# running, and downloads one file through it with `dlsessionctl get --wait`.
#
#   ./scripts/quickstart.sh              # from a server this script starts on 127.0.0.1
#   ./scripts/quickstart.sh URL [OUTPUT] # from any URL you give
#
# Without a URL nothing leaves the machine: `dlsession-serve` (from crates/testkit) serves
# 64 MiB on loopback, and the downloaded file's SHA-256 is checked against it. The file
# lands in the current directory. DLSESSION_PROFILE=dev builds a debug build instead.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."

profile=${DLSESSION_PROFILE:-release}
# Two builds: `--bin` would limit every package named with it to that binary.
cargo build --profile "$profile" --locked -p dlsessiond -p dlsessionctl
cargo build --profile "$profile" --locked -p dlsession-testkit --bin dlsession-serve
for b in dlsessiond dlsessionctl dlsession-serve; do
    [ -x "${CARGO_TARGET_DIR:-$PWD/target}/$([ "$profile" = dev ] && echo debug || echo "$profile")/$b" ] || {
        echo "quickstart: $b was not built" >&2
        exit 1
    }
done
[ "$profile" = dev ] && dir=debug || dir=$profile
bin=${CARGO_TARGET_DIR:-$PWD/target}/$dir

want=""
if [ $# -ge 1 ]; then
    url=$1
else
    info=$(mktemp)
    "$bin/dlsession-serve" 64 >"$info" &
    server=$!
    trap 'kill $server 2>/dev/null || true; rm -f "$info"' EXIT
    for _ in $(seq 100); do [ "$(wc -l <"$info")" -ge 2 ] && break; sleep 0.05; done
    url=$(sed -n 1p "$info")
    want=$(sed -n 2p "$info")
    echo "serving $url (SHA-256 $want)"
fi
out=${2:-$here/$(basename "${url%%\?*}")}

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
got=$(sha256sum "$out" | cut -d' ' -f1)
echo "$got  $out"
if [ -n "$want" ]; then
    [ "$got" = "$want" ] || { echo "SHA-256 mismatch: expected $want" >&2; exit 1; }
    echo "the file is byte-exact"
fi
