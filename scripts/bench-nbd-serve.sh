#!/usr/bin/env bash
# Times `nbdcopy nbd://... out.raw` over loopback TCP from `vimg serve` against from qemu-nbd,
# both serving the same qcow2 read-only (-r -e 4 -t), and prints best, median and every run,
# with the server's peak RSS (/usr/bin/time -f %M on the server process).
# Usage: scripts/bench-nbd-serve.sh [WORKDIR]   (default /tmp/vimg-bench-nbd-serve; needs ~5 GiB free)
# The image is the 2 GiB ext4 disk ../shared/bench/make-image.sh builds, converted to qcow2 by
# qemu-img; an existing /tmp/vimg-bench/test.raw is linked rather than rebuilt.
# REPS rounds (default 10), the servers alternating in both orders; each run starts a fresh
# server, removes the output and syncs the page cache. BASE=/path/to/another/vimg adds that
# build as a third contestant (the same rounds, rotating orders), e.g. main's before a change.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/bench-lib.sh"
W=${1:-/tmp/vimg-bench-nbd-serve}
REPS=${REPS:-10}
mkdir -p "$W"
if [ ! -f "$W/test.raw" ]; then
  if [ -f /tmp/vimg-bench/test.raw ]; then
    ln /tmp/vimg-bench/test.raw "$W/test.raw" 2>/dev/null || cp /tmp/vimg-bench/test.raw "$W/test.raw"
  else
    bash "$here/../shared/bench/make-image.sh" "$W"
  fi
fi
[ -f "$W/test.qcow2" ] || qemu-img convert -f raw -O qcow2 "$W/test.raw" "$W/test.qcow2"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
VIMG=$here/target/release/vimg
PORT=${PORT:-10877}
OUT=$W/out.raw

# serve_once SERVER...: serves test.qcow2 with that server command, copies it with nbdcopy;
# prints "secs rss" (nbdcopy's wall time, the server's peak RSS in KiB).
serve_once() {
  rm -f "$OUT" "$W/pid" "$W/srv-time.txt"
  sync
  sleep 1
  /usr/bin/time -f '%M' -o "$W/srv-time.txt" "$@" -r -t -e 4 -f qcow2 \
    -b 127.0.0.1 -p "$PORT" -x bench --pid-file "$W/pid" "$W/test.qcow2" &
  local tpid=$!
  for _ in $(seq 200); do [ -s "$W/pid" ] && nbdinfo --size "nbd://127.0.0.1:$PORT/bench" >/dev/null 2>&1 && break; sleep 0.05; done
  /usr/bin/time -f '%e' -o "$W/copy-time.txt" nbdcopy "nbd://127.0.0.1:$PORT/bench" "$OUT"
  kill -TERM "$(cat "$W/pid")"
  wait "$tpid" || true
  echo "$(cat "$W/copy-time.txt") $(tail -1 "$W/srv-time.txt")"
}

# Each vimg copy is checked against the image.
checked() {
  local res
  res=$(serve_once "$@")
  qemu-img compare -q -f raw -F qcow2 "$OUT" "$W/test.qcow2" || { echo "OUTPUT DIFFERS" >&2; return 1; }
  echo "$res"
}
run_qemu() { serve_once qemu-nbd; }
run_vimg() { checked "$VIMG" serve; }
run_base() { checked "$BASE" serve; }

names=(qemu vimg)
[ -n "${BASE:-}" ] && names+=(base)
rounds "${names[@]}"
rm -f "$OUT"
row() { # row LABEL NAME: NAME's best and median against qemu-nbd's
  local q=($(times_of qemu)) v=($(times_of "$2"))
  local qb vb qm vm
  qb=$(best "${q[@]}"); vb=$(best "${v[@]}"); qm=$(median "${q[@]}"); vm=$(median "${v[@]}")
  printf '%-34s %7ss %7ss %6s %7ss %7ss %6s %9s %9s\n' "$1" "$qb" "$vb" \
    "$(ratio "$qb" "$vb")" "$qm" "$vm" "$(ratio "$qm" "$vm")" "$rss_qemu" "$(eval "echo \$rss_$2")"
}
printf '%-34s %8s %8s %6s %8s %8s %6s %9s %9s\n' case qemu-best vimg-best ratio qemu-med vimg-med ratio qemu-RSS vimg-RSS
row "nbdcopy from the server (qcow2)" vimg
[ -n "${BASE:-}" ] && row "  the same, vimg before (BASE)" base
echo "(ratio = qemu-nbd time / vimg serve time, best and median of $REPS runs each; RSS: the server's peak KiB)"
echo "qemu-nbd runs:   $(times_of qemu)"
echo "vimg serve runs: $(times_of vimg)"
[ -n "${BASE:-}" ] && echo "BASE runs:       $(times_of base)"
echo "load: $(uptime)"
