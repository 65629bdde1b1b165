#!/usr/bin/env bash
# Times vimg against qemu-img converting to and from a block device (a loop device over a file)
# in one run, as Proxmox imports and exports disks, and prints best, median and every run of
# each tool with the ratios of the same rounds.
#
# usage: scripts/bench-devices.sh [WORKDIR]   (default /tmp/vimg-bench, shared with
#        bench-vs-qemu.sh; needs root for losetup and ~7 GiB free)
# env:   ROUNDS (default 10) rounds per case, each round one run of each tool;
#        ONLY='regex' runs only the cases whose label matches;
#        VIMG (default: this tree's target/release/vimg, built first);
#        BASE=/path/to/an/older/vimg times that build in qemu-img's place (the check that a
#        change helps, on the same cases; the columns still say qemu).
#
# The source is ../shared/bench/make-image.sh's 2 GiB ext4 disk image (WORKDIR/test.raw, built
# once and kept) and its qcow2 (WORKDIR/test.qcow2). A 2 GiB sparse file WORKDIR/dev.img is
# attached as a loop device for the run and detached on exit.
#
# Cases (the forms Proxmox uses):
#   qcow2 -> device   convert -p -n -f qcow2 -O raw [-t none] test.qcow2 /dev/loopN
#   device -> qcow2   convert -p -f raw -O qcow2 [-t none | -T none -t none] /dev/loopN out.qcow2
#
# Fairness, the same for both tools before every timed run:
# - qcow2 -> device: the device's backing file is punched (the device reads zeros, as a fresh
#   thin volume; neither tool is told so), and the device's own page cache dropped (BLKFLSBUF).
# - device -> qcow2: the device holds test.raw (written once before these cases); the output
#   file is removed and the device's page cache dropped, so every read goes through the loop
#   driver to the backing file.
# - then sync and 1 s of quiet. The global page cache is NOT dropped: the source files and the
#   backing file stay cached as they were (dropping it hands memory back to the host of this VM,
#   which makes the next runs slower by a varying amount).
# - the tools alternate in both orders (qemu-img first in odd rounds, vimg first in even ones).
# After each case, vimg's result is checked against the source with qemu-img compare (and
# qemu-img check for qcow2 outputs).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench-lib.sh
. "$here/scripts/bench-lib.sh"
W=${1:-/tmp/vimg-bench}
ROUNDS=${ROUNDS:-10}
mkdir -p "$W"
[ -f "$W/test.raw" ] || bash "$here/../shared/bench/make-image.sh" "$W"
[ -f "$W/test.qcow2" ] || qemu-img convert -O qcow2 "$W/test.raw" "$W/test.qcow2"
if [ -z "${VIMG:-}" ]; then
  cargo build --release --quiet --manifest-path "$here/Cargo.toml"
  VIMG=$here/target/release/vimg
fi
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (GNU time) for peak RSS" >&2; exit 1; }
SIZE=$(stat -c %s "$W/test.raw")
BACK=$W/dev.img
rm -f "$BACK"
truncate -s "$SIZE" "$BACK"
DEV=$(losetup -f --show "$BACK")
trap 'losetup -d "$DEV"; rm -f "$BACK" "$W/dev-out.qcow2" "$W/time.txt"' EXIT

# Puts the device in the state a case starts from (see the header).
reset_dev() {
  if [ "$1" = zero ]; then
    sync
    fallocate -p -o 0 -l "$SIZE" "$BACK"
  fi
  rm -f "$W/dev-out.qcow2"
  sync
  blockdev --flushbufs "$DEV"
  sleep 1
}

# One timed run: prints wall seconds and peak RSS KiB.
once() {
  /usr/bin/time -f '%e %M' -o "$W/time.txt" "$@" >/dev/null
  cat "$W/time.txt"
}

: >"$W/dev-runs.txt"
FILLED=
# case_ LABEL STATE ARGS...: STATE is zero (device re-zeroed before each run) or keep; ARGS
# are the convert arguments, the same for both tools.
case_() {
  local label=$1 state=$2; shift 2
  if [ -n "${ONLY:-}" ] && ! [[ $label =~ $ONLY ]]; then return 0; fi
  if [ "$state" = keep ] && [ -z "$FILLED" ]; then
    # the device holds the image for the device -> qcow2 cases
    dd if="$W/test.raw" of="$DEV" bs=1M conv=fsync status=none
    FILLED=1
  fi
  local A=${BASE:-qemu-img}
  local qts=() vts=() qrs=() vrs=() rr=() t r i line=""
  for i in $(seq "$ROUNDS"); do
    local order
    if ((i % 2)); then order="A V"; else order="V A"; fi
    local tool
    for tool in $order; do
      reset_dev "$state"
      if [ "$tool" = A ]; then read -r t r < <(once "$A" convert "$@"); else read -r t r < <(once "$VIMG" convert "$@"); fi
      if [ "$tool" = A ]; then qts+=("$t"); qrs+=("$r"); else vts+=("$t"); vrs+=("$r"); fi
    done
    rr+=("$(ratio "${qts[-1]}" "${vts[-1]}")")
    line+=" | ${i}:$( ((i % 2)) && echo "q ${qts[-1]} v ${vts[-1]}" || echo "v ${vts[-1]} q ${qts[-1]}") (${rr[-1]})"
  done
  # vimg's result checked (its own untimed run, from the same state).
  reset_dev "$state"
  "$VIMG" convert "$@" >/dev/null
  if [ "$state" = zero ]; then
    qemu-img compare -q -f raw -F qcow2 "$DEV" "$W/test.qcow2" || { echo "DEVICE DIFFERS for $label" >&2; exit 1; }
  else
    qemu-img check -q "$W/dev-out.qcow2" || { echo "CHECK FAILED for $label" >&2; exit 1; }
    qemu-img compare -q -f raw -F qcow2 "$W/test.raw" "$W/dev-out.qcow2" || { echo "OUTPUT DIFFERS for $label" >&2; exit 1; }
  fi
  local qb vb qm vm
  qb=$(best "${qts[@]}"); vb=$(best "${vts[@]}"); qm=$(median "${qts[@]}"); vm=$(median "${vts[@]}")
  local rnum=(); for r in "${rr[@]}"; do rnum+=("${r%x}"); done
  printf '%-34s %7ss %7ss %6s %7ss %7ss %6s %7s %8s %8s\n' "$label" "$qb" "$vb" "$(ratio "$qb" "$vb")" \
    "$qm" "$vm" "$(ratio "$qm" "$vm")" "$(ratio "$(median "${rnum[@]}")" 1)" \
    "$(printf '%s\n' "${qrs[@]}" | sort -g | tail -1)" "$(printf '%s\n' "${vrs[@]}" | sort -g | tail -1)"
  {
    echo "  $label (round: order, seconds, qemu-img/vimg)$line"
    echo "    peak RSS KiB qemu-img ${qrs[*]}; vimg ${vrs[*]}"
  } >>"$W/dev-runs.txt"
}

echo "device $DEV over $BACK ($SIZE bytes), $ROUNDS rounds per case, vimg $VIMG against ${BASE:-qemu-img}"
printf '%-34s %8s %8s %6s %8s %8s %6s %7s %8s %8s\n' case qemu-best vimg-best ratio qemu-med vimg-med ratio rnd-med qemu-RSS vimg-RSS
case_ "qcow2 -> device" zero -p -n -f qcow2 -O raw "$W/test.qcow2" "$DEV"
case_ "qcow2 -> device -t none" zero -p -n -f qcow2 -O raw -t none "$W/test.qcow2" "$DEV"
case_ "device -> qcow2" keep -p -f raw -O qcow2 "$DEV" "$W/dev-out.qcow2"
case_ "device -> qcow2 -t none" keep -p -f raw -O qcow2 -t none "$DEV" "$W/dev-out.qcow2"
case_ "device -> qcow2 -T none -t none" keep -p -f raw -O qcow2 -T none -t none "$DEV" "$W/dev-out.qcow2"
echo "(ratio = qemu-img time / vimg time: of the best runs, of the medians, and the median of each round's ratio; RSS: peak KiB over all runs)"
echo "every run:"
cat "$W/dev-runs.txt"
