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
    rm -f "$W/out.raw"
    sync
    /usr/bin/time -f '%e %M' -o "$W/time.txt" "$@" >/dev/null
    read -r t r < "$W/time.txt"
    if [ -z "$best" ] || awk "BEGIN{exit !($t < $best)}"; then best=$t; fi
    [ "$r" -gt "$rss" ] && rss=$r
  done
  echo "$best $rss"
}

printf '%-28s %10s %10s %8s %12s %12s\n' case qemu-img vimg ratio qemu-rss-KiB vimg-rss-KiB
for src in test.raw test.qcow2 test-z.qcow2 test-zstd.qcow2; do
  read -r qt qr < <(measure qemu-img convert -O raw "$W/$src" "$W/out.raw")
  qemu_sum=$(md5sum < "$W/out.raw")
  read -r vt vr < <(measure "$VIMG" convert -O raw "$W/$src" "$W/out.raw")
  vimg_sum=$(md5sum < "$W/out.raw")
  [ "$qemu_sum" = "$vimg_sum" ] || { echo "OUTPUT DIFFERS for $src" >&2; exit 1; }
  ratio=$(awk "BEGIN{printf \"%.2fx\", $qt / ($vt > 0 ? $vt : 0.001)}")
  printf '%-28s %9ss %9ss %8s %12s %12s\n' "convert $src -> raw" "$qt" "$vt" "$ratio" "$qr" "$vr"
done
echo "(ratio = qemu-img time / vimg time; above 1 means vimg is faster)"
