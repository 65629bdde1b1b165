#!/usr/bin/env bash
# Times vimg against qemu-img reading and writing VHDX (issue 17), and prints best, median and
# every run of each tool, the ratios qemu-img/vimg and the peak RSS.
#
# usage: scripts/bench-vhdx.sh [WORKDIR]   (default /tmp/vimg-bench, shared with the other
#        bench scripts; needs ~5 GiB free)
# env:   REPS (default 10) rounds per case, each round one run of each tool;
#        ONLY='regex' runs only the cases whose label matches;
#        VIMG (default: this tree's target/release/vimg, built first).
#
# The source is ../shared/bench/make-image.sh's 2 GiB ext4 disk image (WORKDIR/test.raw, built
# once and kept), and its dynamic VHDX made once by qemu-img (WORKDIR/test.vhdx).
#
# Cases:
#   vhdx -> raw    convert -O raw of test.vhdx
#   raw -> vhdx    convert -O vhdx of test.raw
#
# Fairness, the same for both tools before every timed run: both outputs removed, sync, 1 s of
# quiet; the tools alternate in both orders (qemu-img first in odd rounds, vimg first in even
# ones). The page cache is not dropped. Each tool's last output is compared with test.raw by
# qemu-img compare (and a VHDX checked by qemu-img check).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench-lib.sh
. "$here/scripts/bench-lib.sh"
W=${1:-/tmp/vimg-bench}
REPS=${REPS:-10}
mkdir -p "$W"
[ -f "$W/test.raw" ] || bash "$here/../shared/bench/make-image.sh" "$W"
if [ -z "${VIMG:-}" ]; then
  cargo build --release --quiet --manifest-path "$here/Cargo.toml"
  VIMG=$here/target/release/vimg
fi
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (GNU time) for peak RSS" >&2; exit 1; }
if [ ! -f "$W/test.vhdx" ]; then
  qemu-img convert -O vhdx "$W/test.raw" "$W/test.vhdx.part"
  mv "$W/test.vhdx.part" "$W/test.vhdx"
fi
trap 'rm -f "$W/vhdx-q.out" "$W/vhdx-v.out" "$W/vhdx-time.txt" "$W/vhdx-err.txt"' EXIT

# One timed run: prints wall seconds, peak RSS KiB and the exit status.
once() {
  local rc=0
  /usr/bin/time -f '%e %M' -o "$W/vhdx-time.txt" "$@" >/dev/null 2>"$W/vhdx-err.txt" || rc=$?
  echo "$(tail -1 "$W/vhdx-time.txt") $rc"
}

: >"$W/vhdx-runs.txt"
# case_ LABEL FORMAT SOURCE: convert SOURCE to FORMAT with each tool.
case_() {
  local label=$1 fmt=$2 src=$3
  if [ -n "${ONLY:-}" ] && ! [[ $label =~ $ONLY ]]; then return 0; fi
  local qts=() vts=() qrs=() vrs=() rr=() t r rc i tool order line=""
  for i in $(seq "$REPS"); do
    if ((i % 2)); then order="Q V"; else order="V Q"; fi
    for tool in $order; do
      # Only this tool's output: the other's is kept for the check after the last round.
      if [ "$tool" = Q ]; then rm -f "$W/vhdx-q.out"; else rm -f "$W/vhdx-v.out"; fi
      sync
      sleep 1
      if [ "$tool" = Q ]; then
        read -r t r rc < <(once qemu-img convert -O "$fmt" "$src" "$W/vhdx-q.out")
        [ "$rc" = 0 ] || { echo "qemu-img FAILED for $label: $(cat "$W/vhdx-err.txt")" >&2; exit 1; }
        qts+=("$t"); qrs+=("$r")
      else
        read -r t r rc < <(once "$VIMG" convert -O "$fmt" "$src" "$W/vhdx-v.out")
        [ "$rc" = 0 ] || { echo "vimg FAILED for $label: $(cat "$W/vhdx-err.txt")" >&2; exit 1; }
        vts+=("$t"); vrs+=("$r")
      fi
    done
    rr+=("$(ratio "${qts[-1]}" "${vts[-1]}")")
    line+=" | ${i}:$( ((i % 2)) && echo "q ${qts[-1]} v ${vts[-1]}" || echo "v ${vts[-1]} q ${qts[-1]}") (${rr[-1]})"
  done
  local out
  for out in "$W/vhdx-q.out" "$W/vhdx-v.out"; do
    if [ "$fmt" = vhdx ]; then
      qemu-img check -q "$out" || { echo "CHECK FAILED for $label ($out)" >&2; exit 1; }
    fi
    qemu-img compare -q -F "$fmt" "$W/test.raw" "$out" ||
      { echo "OUTPUT DIFFERS for $label ($out)" >&2; exit 1; }
  done
  rm -f "$W/vhdx-q.out" "$W/vhdx-v.out"
  local qb qm qr vb vm vr rnum=()
  qb=$(best "${qts[@]}"); qm=$(median "${qts[@]}"); qr=$(printf '%s\n' "${qrs[@]}" | sort -g | tail -1)
  vb=$(best "${vts[@]}"); vm=$(median "${vts[@]}"); vr=$(printf '%s\n' "${vrs[@]}" | sort -g | tail -1)
  for r in "${rr[@]}"; do rnum+=("${r%x}"); done
  printf '%-16s %7ss %7ss %6s %7ss %7ss %6s %7s %8s %8s %6s\n' "$label" "$qb" "$vb" "$(ratio "$qb" "$vb")" \
    "$qm" "$vm" "$(ratio "$qm" "$vm")" "$(ratio "$(median "${rnum[@]}")" 1)" "$qr" "$vr" "$(ratio "$qr" "$vr")"
  {
    echo "  $label (round: order, seconds, qemu-img/vimg)$line"
    echo "    peak RSS KiB qemu-img ${qrs[*]}; vimg ${vrs[*]}"
  } >>"$W/vhdx-runs.txt"
}

echo "source $W/test.raw and $W/test.vhdx, $REPS rounds per case, vimg $VIMG against qemu-img"
printf '%-16s %8s %8s %6s %8s %8s %6s %7s %8s %8s %6s\n' case qemu-best vimg-best ratio qemu-med vimg-med ratio rnd-med qemu-RSS vimg-RSS RSS
case_ "vhdx -> raw" raw "$W/test.vhdx"
case_ "raw -> vhdx" vhdx "$W/test.raw"
echo "(ratio = qemu-img time / vimg time: of the best runs, of the medians, and the median of each round's ratio; RSS: peak KiB over all runs, and qemu-img's / vimg's)"
echo "every run:"
cat "$W/vhdx-runs.txt"
