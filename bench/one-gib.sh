#!/usr/bin/env bash
# One 1 GiB file over HTTP on loopback, served by nginx: `curl -o` next to
# `dlsessionctl get --wait` (release build, isolated daemon), alternating, N runs each.
# Prints wall time and CPU of each, the daemon's peak RSS, and checks the SHA-256.
#
#   bench/one-gib.sh [RUNS]        (needs nginx; installs nginx-light with apt-get if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
work=${TMPDIR:-/tmp}/dlsessiond-bench
port=18080
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null; }
cargo build --release --locked -p dlsessiond -p dlsessionctl >/dev/null
bin=$PWD/target/release

mkdir -p "$work/www" "$work/nginx"
[ -s "$work/www/1g.bin" ] || head -c 1073741824 /dev/urandom >"$work/www/1g.bin"
want=$(sha256sum "$work/www/1g.bin" | cut -d' ' -f1)
cat >"$work/nginx/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 64; }
http { access_log off; sendfile on; server { listen 127.0.0.1:$port; root $work/www; } }
CONF
nginx -c "$work/nginx/nginx.conf"
export HOME=$work/home XDG_RUNTIME_DIR=$work/run
rm -rf "$HOME" "$XDG_RUNTIME_DIR" "$work/out"; mkdir -p "$HOME" "$XDG_RUNTIME_DIR" "$work/out"; chmod 700 "$XDG_RUNTIME_DIR"
"$bin/dlsessiond" >"$work/daemon.log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; nginx -c "$work/nginx/nginx.conf" -s stop' EXIT
until "$bin/dlsessionctl" status >/dev/null 2>&1; do sleep 0.1; done
url=http://127.0.0.1:$port/1g.bin
tck=$(getconf CLK_TCK)
cpu() { awk -v t="$tck" '{printf "%.2f", ($14+$15)/t}' "/proc/$1/stat"; }
now() { date +%s.%N; }
echo "machine: $(nproc) cores, $(uname -r); file: 1 GiB from nginx on 127.0.0.1"
for i in $(seq "$runs"); do
    rm -f "$work/out"/*
    t0=$(now); /usr/bin/time -f "%U+%S" -o "$work/curl.time" curl -s -o "$work/out/curl.bin" "$url"; t1=$(now)
    printf "curl        run %d: %.2f s wall, cpu %s s\n" "$i" "$(echo "$t1 - $t0" | bc)" "$(cat "$work/curl.time")"
    rm -f "$work/out"/*
    c0=$(cpu $daemon); t0=$(now)
    "$bin/dlsessionctl" get "$url" -o "$work/out/d.bin" --wait >/dev/null
    t1=$(now); c1=$(cpu $daemon)
    printf "dlsessiond  run %d: %.2f s wall, daemon cpu %.2f s\n" "$i" "$(echo "$t1 - $t0" | bc)" "$(echo "$c1 - $c0" | bc)"
    [ "$(sha256sum "$work/out/d.bin" | cut -d' ' -f1)" = "$want" ] || { echo "SHA-256 mismatch"; exit 1; }
done
echo "daemon peak RSS: $(awk '/VmHWM/ {print $2, $3}' "/proc/$daemon/status")"
