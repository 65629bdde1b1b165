#!/usr/bin/env bash
# Times `convert -O raw nbd://...` (vimg's NBD client) against qemu-img's, both reading the same
# export of ONE qemu-nbd (-r -t -e 4 -f qcow2) over TCP loopback, and prints best, median and
# every run, with peak RSS.
# Usage: scripts/bench-nbd-client.sh [WORKDIR]   (default /tmp/vimg-bench-nbd; needs ~5 GiB free)
# The image is the 2 GiB ext4 disk ../shared/bench/make-image.sh builds, as qcow2 (an existing
# /tmp/vimg-bench/test.raw or test.qcow2 is linked rather than rebuilt). REPS rounds (default
# 10), the tools alternating in both orders; each run starts with both outputs removed and the
# page cache synced (see scripts/bench-vs-qemu.sh). Outputs are checked equal to each other and
# to the image.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/bench-lib.sh"
W=${1:-/tmp/vimg-bench-nbd}
REPS=${REPS:-10}
PORT=${PORT:-10830}
mkdir -p "$W"
if [ ! -f "$W/test.qcow2" ]; then
  if [ -f /tmp/vimg-bench/test.qcow2 ]; then
    ln /tmp/vimg-bench/test.qcow2 "$W/test.qcow2" 2>/dev/null || cp /tmp/vimg-bench/test.qcow2 "$W/test.qcow2"
  else
    if [ ! -f "$W/test.raw" ]; then
      if [ -f /tmp/vimg-bench/test.raw ]; then
        ln /tmp/vimg-bench/test.raw "$W/test.raw" 2>/dev/null || cp /tmp/vimg-bench/test.raw "$W/test.raw"
      else
        bash "$here/../shared/bench/make-image.sh" "$W"
      fi
    fi
    qemu-img convert -f raw -O qcow2 "$W/test.raw" "$W/test.qcow2"
  fi
fi
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
VIMG=$here/target/release/vimg
qemu-nbd -r -t -e 4 -f qcow2 -x bench -b 127.0.0.1 -p "$PORT" --pid-file "$W/qemu-nbd.pid" "$W/test.qcow2" &
NBD_PID=$!
trap 'kill "$NBD_PID" 2>/dev/null; wait "$NBD_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$W/qemu-nbd.pid" ] && break; sleep 0.1; done
URL=nbd://127.0.0.1:$PORT/bench
ARGS=(-f raw -O raw "$URL")
OUTS=("$W/qemu.raw" "$W/vimg.raw")

run_qemu() { once qemu-img convert "${ARGS[@]}" "$W/qemu.raw"; }
run_vimg() { once "$VIMG" convert "${ARGS[@]}" "$W/vimg.raw"; }
rounds qemu vimg
qts=($(times_of qemu)) vts=($(times_of vimg)) qr=$rss_qemu vr=$rss_vimg
[ -f "$W/qemu.raw" ] || qemu-img convert "${ARGS[@]}" "$W/qemu.raw"
[ -f "$W/vimg.raw" ] || "$VIMG" convert "${ARGS[@]}" "$W/vimg.raw"
cmp -s "$W/qemu.raw" "$W/vimg.raw" || { echo "OUTPUT DIFFERS" >&2; exit 1; }
qemu-img compare -q -f raw -F qcow2 "$W/vimg.raw" "$W/test.qcow2" || { echo "OUTPUT DIFFERS FROM THE IMAGE" >&2; exit 1; }
qsize=$(du -k "$W/qemu.raw" | cut -f1); vsize=$(du -k "$W/vimg.raw" | cut -f1)
rm -f "${OUTS[@]}"
qb=$(best "${qts[@]}"); vb=$(best "${vts[@]}"); qm=$(median "${qts[@]}"); vm=$(median "${vts[@]}")
printf '%-34s %8s %8s %6s %8s %8s %6s %9s %9s %9s %9s\n' case qemu-best vimg-best ratio qemu-med vimg-med ratio qemu-RSS vimg-RSS qemu-out vimg-out
printf '%-34s %7ss %7ss %6s %7ss %7ss %6s %9s %9s %9s %9s\n' "nbd:// (qemu-nbd, qcow2) -> raw" "$qb" "$vb" \
  "$(ratio "$qb" "$vb")" "$qm" "$vm" "$(ratio "$qm" "$vm")" "$qr" "$vr" "$qsize" "$vsize"
echo "(ratio = qemu-img time / vimg time, best and median of $REPS runs each; RSS: peak KiB; out: KiB on disk)"
echo "qemu-img runs: ${qts[*]}"
echo "vimg runs:     ${vts[*]}"
