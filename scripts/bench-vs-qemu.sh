#!/usr/bin/env bash
# Times vimg against qemu-img on the same images in one run, and prints ratios.
# Usage: scripts/bench-vs-qemu.sh [WORKDIR]   (default /tmp/vimg-bench; needs ~8 GiB free)
# The source image is built by ../shared/bench/make-image.sh (a 2 GiB ext4 disk image) when
# WORKDIR/test.raw does not exist yet. Each command runs REPS times (default 3); the best wall
# time and the peak RSS (from /usr/bin/time) are reported.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vimg-bench}
REPS=${REPS:-3}
mkdir -p "$W"
[ -f "$W/test.raw" ] || bash "$here/../shared/bench/make-image.sh" "$W"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
VIMG=$here/target/release/vimg
[ -f "$W/test.qcow2" ] || qemu-img convert -O qcow2 "$W/test.raw" "$W/test.qcow2"
[ -f "$W/test-z.qcow2" ] || qemu-img convert -c -O qcow2 "$W/test.raw" "$W/test-z.qcow2"
[ -f "$W/test-zstd.qcow2" ] || qemu-img convert -c -O qcow2 -o compression_type=zstd "$W/test.raw" "$W/test-zstd.qcow2"

# best-of-REPS wall seconds and max RSS KiB of a command
measure() {
  local best="" rss=0 t r
  for _ in $(seq "$REPS"); do
    rm -f "$W/out.raw" "$W/out.qcow2"
    sync
    /usr/bin/time -f '%e %M' -o "$W/time.txt" "$@" >/dev/null
    read -r t r < "$W/time.txt"
    if [ -z "$best" ] || awk "BEGIN{exit !($t < $best)}"; then best=$t; fi
    [ "$r" -gt "$rss" ] && rss=$r
  done
  echo "$best $rss"
}

# One case: the same convert arguments for both tools; outputs must be equivalent.
case_() {
  local label=$1 out=$2; shift 2
  read -r qt qr < <(measure qemu-img convert "$@" "$W/$out")
  local qsize; qsize=$(du -k "$W/$out" | cut -f1)
  cp --sparse=always "$W/$out" "$W/qemu-$out"
  read -r vt vr < <(measure "$VIMG" convert "$@" "$W/$out")
  local vsize; vsize=$(du -k "$W/$out" | cut -f1)
  if [[ $out == *.qcow2 ]]; then
    qemu-img check -q "$W/$out" || { echo "CHECK FAILED for $label" >&2; exit 1; }
  fi
  qemu-img compare -q "$W/qemu-$out" "$W/$out" || { echo "OUTPUT DIFFERS for $label" >&2; exit 1; }
  rm -f "$W/qemu-$out"
  ratio=$(awk "BEGIN{printf \"%.2fx\", $qt / ($vt > 0 ? $vt : 0.001)}")
  printf '%-30s %9ss %9ss %7s %10s %10s %10s %10s\n' "$label" "$qt" "$vt" "$ratio" "$qr" "$vr" "$qsize" "$vsize"
}

printf '%-30s %10s %10s %7s %10s %10s %10s %10s\n' case qemu-img vimg speedup qemu-KiB vimg-KiB qemu-out vimg-out
for src in test.raw test.qcow2 test-z.qcow2 test-zstd.qcow2; do
  case_ "$src -> raw" out.raw -O raw "$W/$src"
done
case_ "test.raw -> qcow2" out.qcow2 -O qcow2 "$W/test.raw"
case_ "test.qcow2 -> qcow2" out.qcow2 -O qcow2 "$W/test.qcow2"
case_ "test.raw -> qcow2 -c zlib" out.qcow2 -c -O qcow2 "$W/test.raw"
case_ "test.raw -> qcow2 -c zstd" out.qcow2 -c -O qcow2 -o compression_type=zstd "$W/test.raw"
echo "(speedup = qemu-img time / vimg time, best of $REPS; KiB columns: peak RSS, then output size on disk)"
