#!/usr/bin/env bash
# Times vimg against qemu-img on VMDK streamOptimized disks in one run, and prints best, median
# and every run of each tool, the ratios qemu-img/vimg and the peak RSS.
#
# usage: scripts/bench-vmdk.sh [WORKDIR]   (default /tmp/vimg-bench-vmdk; needs ~6 GiB free)
# env:   REPS (default 10) rounds per case, each round one run of each tool;
#        VIMG (default: this tree's target/release/vimg, built first);
#        BASE=/path/to/an/older/vimg times that build in qemu-img's place.
#
# The source is ../shared/bench/make-image.sh's 2 GiB ext4 disk image (WORKDIR/test.raw, built
# once and kept), its qcow2 (WORKDIR/test.qcow2) and its streamOptimized vmdk
# (WORKDIR/test-stream.vmdk), both made once by qemu-img.
#
# Cases:
#   (a) vmdk streamOptimized -> qcow2    convert -O qcow2 (inflating every grain)
#   (b) qcow2 -> vmdk streamOptimized    convert -O vmdk -o subformat=streamOptimized (deflating
#                                        every grain, written in order)
#
# Fairness, the same for both tools before every timed run: both outputs removed, sync, 1 s of
# quiet; the tools alternate in both orders (qemu-img first in odd rounds, vimg first in even
# ones). The page cache is not dropped. Each tool's last output is checked against test.raw with
# qemu-img compare, and with qemu-img check.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench-lib.sh
. "$here/scripts/bench-lib.sh"
W=${1:-/tmp/vimg-bench-vmdk}
REPS=${REPS:-10}
mkdir -p "$W"
[ -f "$W/test.raw" ] || bash "$here/../shared/bench/make-image.sh" "$W"
if [ -z "${VIMG:-}" ]; then
  cargo build --release --quiet --manifest-path "$here/Cargo.toml"
  VIMG=$here/target/release/vimg
fi
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (GNU time) for peak RSS" >&2; exit 1; }
A=${BASE:-qemu-img}
[ -f "$W/test.qcow2" ] || { qemu-img convert -O qcow2 "$W/test.raw" "$W/test.qcow2.part" && mv "$W/test.qcow2.part" "$W/test.qcow2"; }
[ -f "$W/test-stream.vmdk" ] || {
  qemu-img convert -O vmdk -o subformat=streamOptimized "$W/test.raw" "$W/test-stream.part.vmdk"
  mv "$W/test-stream.part.vmdk" "$W/test-stream.vmdk"
}
trap 'rm -f "$W"/vmdk-q.* "$W"/vmdk-v.* "$W/vmdk-time.txt" "$W/vmdk-err.txt"' EXIT

# One timed run: prints wall seconds, peak RSS KiB and the exit status.
once() {
  local rc=0
  /usr/bin/time -f '%e %M' -o "$W/vmdk-time.txt" "$@" >/dev/null 2>"$W/vmdk-err.txt" || rc=$?
  echo "$(tail -1 "$W/vmdk-time.txt") $rc"
}

# case_ LABEL OUT-EXTENSION CONVERT-ARGS... (the output file is appended)
case_() {
  local label=$1 ext=$2; shift 2
  local qts=() vts=() qrs=() vrs=() line="" i t r rc tool order
  for i in $(seq "$REPS"); do
    if ((i % 2)); then order="A V"; else order="V A"; fi
    for tool in $order; do
      rm -f "$W"/vmdk-q.* "$W"/vmdk-v.*
      sync
      sleep 1
      if [ "$tool" = A ]; then
        read -r t r rc < <(once "$A" convert "$@" "$W/vmdk-q.$ext")
        [ "$rc" = 0 ] || { echo "$A FAILED for $label: $(cat "$W/vmdk-err.txt")" >&2; exit 1; }
        qts+=("$t"); qrs+=("$r")
      else
        read -r t r rc < <(once "$VIMG" convert "$@" "$W/vmdk-v.$ext")
        [ "$rc" = 0 ] || { echo "vimg FAILED for $label: $(cat "$W/vmdk-err.txt")" >&2; exit 1; }
        vts+=("$t"); vrs+=("$r")
      fi
    done
    line+=" | ${i}:q ${qts[-1]} v ${vts[-1]} ($(ratio "${qts[-1]}" "${vts[-1]}"))"
  done
  # The last round's outputs checked against the source.
  local out
  for out in "$W/vmdk-q.$ext" "$W/vmdk-v.$ext"; do
    rm -f "$out"
  done
  "$A" convert "$@" "$W/vmdk-q.$ext"
  "$VIMG" convert "$@" "$W/vmdk-v.$ext"
  for out in "$W/vmdk-q.$ext" "$W/vmdk-v.$ext"; do
    qemu-img compare -q "$W/test.raw" "$out" || { echo "$out differs from test.raw" >&2; exit 1; }
    qemu-img check -q "$out" || { echo "$out: qemu-img check failed" >&2; exit 1; }
  done
  local qb vb qm vm
  qb=$(best "${qts[@]}"); vb=$(best "${vts[@]}"); qm=$(median "${qts[@]}"); vm=$(median "${vts[@]}")
  printf '%s\n  best   qemu %s s  vimg %s s  (%s)\n  median qemu %s s  vimg %s s  (%s)\n  peak RSS (median) qemu %s KiB  vimg %s KiB\n  runs%s\n' \
    "$label" "$qb" "$vb" "$(ratio "$qb" "$vb")" "$qm" "$vm" "$(ratio "$qm" "$vm")" \
    "$(median "${qrs[@]}")" "$(median "${vrs[@]}")" "$line"
}

echo "vimg $("$VIMG" --version | head -1), $A $("$A" --version 2>/dev/null | head -1), $(nproc) CPUs, $REPS rounds"
case_ "(a) vmdk streamOptimized -> qcow2" qcow2 -O qcow2 "$W/test-stream.vmdk"
case_ "(b) qcow2 -> vmdk streamOptimized" vmdk -O vmdk -o subformat=streamOptimized "$W/test.qcow2"
