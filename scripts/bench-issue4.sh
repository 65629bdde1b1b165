#!/usr/bin/env bash
# Times vimg against qemu-img on the commands of issue 4, on the same images in one run, and
# prints ratios (qemu-img time / vimg time: above 1 means vimg is faster):
#   - commit of 256 MiB of changes (256 scattered MiB) into a fully allocated 2 GiB qcow2 base;
#   - safe rebase of that overlay onto another 2 GiB qcow2 image that differs from the old
#     base in 256 MiB (every cluster the overlay leaves unallocated is read in both chains);
#   - snapshot create and delete on a fully allocated 2 GiB qcow2 image.
# Usage: scripts/bench-issue4.sh [WORKDIR]   (default /tmp/vimg-bench4; needs ~12 GiB free)
# Every case starts from fresh copies of the same files for both tools (copying is not timed);
# the tools alternate, REPS times each (default 6), qemu-img first in odd rounds and vimg first in
# even ones (the machine's drifting state then falls on both alike); best and median wall times
# are reported,
# and the results are checked (qemu-img check, qemu-img compare against qemu-img's result).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vimg-bench4}
REPS=${REPS:-6}
mkdir -p "$W"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
VIMG=$here/target/release/vimg
G=$((1 << 30))
M=$((1 << 20))

# qemu-io commands writing pattern $2 over [0, $1) in 128 MiB pieces.
fill() {
  local size=$1 p=$2 off=0 args=()
  while [ "$off" -lt "$size" ]; do
    args+=(-c "write -P $p $off $((128 * M))")
    off=$((off + 128 * M))
  done
  printf '%s\n' "${args[@]}"
}

if [ ! -f "$W/base.qcow2" ]; then
  qemu-img create -q -f qcow2 "$W/base.qcow2" 2G
  mapfile -t a < <(fill $((2 * G)) 0x11)
  qemu-io "${a[@]}" "$W/base.qcow2" >/dev/null
fi
if [ ! -f "$W/top.qcow2" ]; then
  # 256 scattered MiB: 1 MiB every 8 MiB.
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$W/top.qcow2"
  args=()
  for i in $(seq 0 255); do args+=(-c "write -P 0x22 $((i * 8 * M)) $M"); done
  qemu-io "${args[@]}" "$W/top.qcow2" >/dev/null
fi
if [ ! -f "$W/other.qcow2" ]; then
  # Another 2 GiB image: the old base's data, except 256 MiB (1 MiB every 8 MiB, offset 4 MiB).
  cp "$W/base.qcow2" "$W/other.qcow2"
  args=()
  for i in $(seq 0 255); do args+=(-c "write -P 0x33 $((i * 8 * M + 4 * M)) $M"); done
  qemu-io "${args[@]}" "$W/other.qcow2" >/dev/null
fi

# One timed run of a command in directory $1: wall seconds, to the millisecond (bash's
# EPOCHREALTIME: snapshot create and delete take a few milliseconds).
timed() {
  local dir=$1 t0 t1; shift
  sync
  t0=$EPOCHREALTIME
  (cd "$dir" && "$@" >/dev/null)
  t1=$EPOCHREALTIME
  awk "BEGIN{printf \"%.3f\", $t1 - $t0}"
}
# Runs "$1" then "$2" (each a function name) in odd rounds $3, the other way round in even ones.
both() {
  if (($3 % 2)); then "$1"; "$2"; else "$2"; "$1"; fi
}
best() { printf '%s\n' "$@" | sort -g | head -1; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# Fresh copies of FILES... in $W/q and $W/v.
fresh() {
  rm -rf "$W/q" "$W/v"
  mkdir -p "$W/q" "$W/v"
  for f in "$@"; do cp "$W/$f" "$W/q/$f"; cp "$W/$f" "$W/v/$f"; done
}

report() {
  local label=$1; shift
  local n=$(($# / 2))
  local qts=("${@:1:$n}") vts=("${@:$((n + 1))}")
  local qb vb qm vm
  qb=$(best "${qts[@]}"); vb=$(best "${vts[@]}"); qm=$(median "${qts[@]}"); vm=$(median "${vts[@]}")
  printf '%-34s %8ss %8ss %6s %8ss %8ss %6s\n' "$label" "$qb" "$vb" \
    "$(awk "BEGIN{printf \"%.2fx\", $qb / ($vb > 0 ? $vb : 0.001)}")" "$qm" "$vm" \
    "$(awk "BEGIN{printf \"%.2fx\", $qm / ($vm > 0 ? $vm : 0.001)}")"
  printf '    runs: qemu-img %s; vimg %s\n' "${qts[*]}" "${vts[*]}"
}

same() {
  qemu-img compare -q "$W/q/$1" "$W/v/$1" || { echo "RESULTS DIFFER: $1" >&2; exit 1; }
  qemu-img check -q "$W/v/$1" || { echo "CHECK FAILED: $1" >&2; exit 1; }
}

printf '%-34s %9s %9s %6s %9s %9s %6s\n' case qemu-best vimg-best ratio qemu-med vimg-med ratio

# commit: 256 MiB of changes into the 2 GiB base, the overlay emptied.
qts=(); vts=()
q_commit() { qts+=("$(timed "$W/q" qemu-img commit top.qcow2)"); }
v_commit() { vts+=("$(timed "$W/v" "$VIMG" commit top.qcow2)"); }
for i in $(seq "$REPS"); do
  fresh base.qcow2 top.qcow2
  both q_commit v_commit "$i"
  same base.qcow2; same top.qcow2
done
report "commit 256 MiB into 2 GiB" "${qts[@]}" "${vts[@]}"

# safe rebase onto the other 2 GiB image.
qts=(); vts=()
q_rebase() { qts+=("$(timed "$W/q" qemu-img rebase -b other.qcow2 -F qcow2 top.qcow2)"); }
v_rebase() { vts+=("$(timed "$W/v" "$VIMG" rebase -b other.qcow2 -F qcow2 top.qcow2)"); }
for i in $(seq "$REPS"); do
  fresh base.qcow2 top.qcow2 other.qcow2
  both q_rebase v_rebase "$i"
  same top.qcow2
done
report "safe rebase onto other 2 GiB" "${qts[@]}" "${vts[@]}"

# snapshot create, then delete, on the fully allocated 2 GiB image.
cq=(); cv=(); dq=(); dv=()
q_create() { cq+=("$(timed "$W/q" qemu-img snapshot -c s1 base.qcow2)"); }
v_create() { cv+=("$(timed "$W/v" "$VIMG" snapshot -c s1 base.qcow2)"); }
q_delete() { dq+=("$(timed "$W/q" qemu-img snapshot -d s1 base.qcow2)"); }
v_delete() { dv+=("$(timed "$W/v" "$VIMG" snapshot -d s1 base.qcow2)"); }
for i in $(seq "$REPS"); do
  fresh base.qcow2
  both q_create v_create "$i"
  qemu-img check -q "$W/v/base.qcow2" || { echo "CHECK FAILED after snapshot -c" >&2; exit 1; }
  both q_delete v_delete "$i"
  same base.qcow2
done
report "snapshot -c on 2 GiB allocated" "${cq[@]}" "${cv[@]}"
report "snapshot -d on 2 GiB allocated" "${dq[@]}" "${dv[@]}"
rm -rf "$W/q" "$W/v"
echo "(ratio = qemu-img time / vimg time, best and median of $REPS runs each, the tools alternating in both orders)"
