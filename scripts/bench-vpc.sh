#!/usr/bin/env bash
# Times raw -> fixed VHD (the Azure upload form: `convert -O vpc -o subformat=fixed,force_size=on`)
# for vimg against qemu-img, and prints best, median and every run, with peak RSS.
# Usage: scripts/bench-vpc.sh [WORKDIR]   (default /tmp/vimg-bench-vpc; needs ~7 GiB free)
# The source is the 2 GiB ext4 disk image ../shared/bench/make-image.sh builds (a multiple of
# 1 MiB, as Azure wants); an existing /tmp/vimg-bench/test.raw is linked rather than rebuilt.
# REPS rounds (default 10), the tools alternating in both orders; each run starts with both
# outputs removed and the page cache synced (see scripts/bench-vs-qemu.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/bench-lib.sh"
W=${1:-/tmp/vimg-bench-vpc}
REPS=${REPS:-10}
mkdir -p "$W"
if [ ! -f "$W/test.raw" ]; then
  if [ -f /tmp/vimg-bench/test.raw ]; then
    ln /tmp/vimg-bench/test.raw "$W/test.raw" 2>/dev/null || cp /tmp/vimg-bench/test.raw "$W/test.raw"
  else
    bash "$here/../shared/bench/make-image.sh" "$W"
  fi
fi
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
VIMG=$here/target/release/vimg
ARGS=(-f raw -O vpc -o subformat=fixed,force_size=on "$W/test.raw")
OUTS=("$W/qemu.vhd" "$W/vimg.vhd")

run_qemu() { once qemu-img convert "${ARGS[@]}" "$W/qemu.vhd"; }
run_vimg() { once "$VIMG" convert "${ARGS[@]}" "$W/vimg.vhd"; }
rounds qemu vimg
qts=($(times_of qemu)) vts=($(times_of vimg)) qr=$rss_qemu vr=$rss_vimg
# Both outputs, checked: the same disk, and the same file but for the footer's time stamp,
# checksum and UUID.
[ -f "$W/qemu.vhd" ] || qemu-img convert "${ARGS[@]}" "$W/qemu.vhd"
[ -f "$W/vimg.vhd" ] || "$VIMG" convert "${ARGS[@]}" "$W/vimg.vhd"
qemu-img compare -q -f vpc -F vpc "$W/qemu.vhd" "$W/vimg.vhd" || { echo "OUTPUT DIFFERS" >&2; exit 1; }
qemu-img compare -q -f vpc -F raw "$W/vimg.vhd" "$W/test.raw" || { echo "OUTPUT DIFFERS FROM THE SOURCE" >&2; exit 1; }
len=$(stat -c %s "$W/vimg.vhd")
cmp -s -n $((len - 512)) "$W/qemu.vhd" "$W/vimg.vhd" || { echo "DISK BYTES DIFFER" >&2; exit 1; }
qsize=$(du -k "$W/qemu.vhd" | cut -f1); vsize=$(du -k "$W/vimg.vhd" | cut -f1)
rm -f "${OUTS[@]}"
qb=$(best "${qts[@]}"); vb=$(best "${vts[@]}"); qm=$(median "${qts[@]}"); vm=$(median "${vts[@]}")
printf '%-34s %8s %8s %6s %8s %8s %6s %9s %9s %9s %9s\n' case qemu-best vimg-best ratio qemu-med vimg-med ratio qemu-RSS vimg-RSS qemu-out vimg-out
printf '%-34s %7ss %7ss %6s %7ss %7ss %6s %9s %9s %9s %9s\n' "raw -> vpc fixed,force_size" "$qb" "$vb" \
  "$(ratio "$qb" "$vb")" "$qm" "$vm" "$(ratio "$qm" "$vm")" "$qr" "$vr" "$qsize" "$vsize"
echo "(ratio = qemu-img time / vimg time, best and median of $REPS runs each; RSS: peak KiB; out: KiB on disk)"
echo "qemu-img runs: ${qts[*]}"
echo "vimg runs:     ${vts[*]}"
