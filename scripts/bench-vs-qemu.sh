#!/usr/bin/env bash
# Times vimg against qemu-img on the same images in one run, and prints ratios.
# Usage: scripts/bench-vs-qemu.sh [WORKDIR]   (default /tmp/vimg-bench; needs ~8 GiB free)
# The source image is built by ../shared/bench/make-image.sh (a 2 GiB ext4 disk image) when
# WORKDIR/test.raw does not exist yet (copied from /tmp/vimg-bench when that has one: give a
# tmpfs directory such as /dev/shm/vimg-bench to measure on tmpfs). Each command runs REPS
# rounds (default 10), the tools alternating in both orders. Reported: best and median wall
# time, median kernel CPU time and peak RSS (from /usr/bin/time); in the list after the table,
# every run's wall, user and system time, the medians by position in the round, and the
# syscall counts (strace -c -f) of one more run of each tool. ONLY='regex' picks cases by label.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/bench-lib.sh"
W=${1:-/tmp/vimg-bench}
REPS=${REPS:-10}
mkdir -p "$W"
if [ ! -f "$W/test.raw" ] && [ -f /tmp/vimg-bench/test.raw ] && [ "$W" != /tmp/vimg-bench ]; then
  cp --sparse=always /tmp/vimg-bench/test.raw "$W/test.raw"
fi
[ -f "$W/test.raw" ] || bash "$here/../shared/bench/make-image.sh" "$W"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
VIMG=$here/target/release/vimg
[ -f "$W/test.qcow2" ] || qemu-img convert -O qcow2 "$W/test.raw" "$W/test.qcow2"
[ -f "$W/test-z.qcow2" ] || qemu-img convert -c -O qcow2 "$W/test.raw" "$W/test-z.qcow2"
[ -f "$W/test-zstd.qcow2" ] || qemu-img convert -c -O qcow2 -o compression_type=zstd "$W/test.raw" "$W/test-zstd.qcow2"

# One timed run: "wall user sys maxrss" (see timed in bench-lib.sh). Both tools' outputs of
# the case (OUTS) are removed first, so that every run starts from the same state whichever
# tool ran before: on this machine a run that follows the other tool's, with that output still
# cached and its own older one just deleted, was up to 10x slower than one that follows its own.
TIME_FILE=$W/time.txt
once() {
  rm -f "${OUTS[@]}"
  sync
  sleep 1
  timed "$@"
}

# median of one column (1 wall, 2 user, 3 sys) of a list of "wall user sys rss" runs
col_median() { local c=$1; shift; median $(printf '%s\n' "$@" | awk -v c="$c" '{print $c}'); }

# One case: the same convert arguments for both tools, REPS rounds, alternating and in both
# orders (qemu-img first in odd rounds, vimg first in even ones), so that the machine's
# drifting state (page cache, host memory, the previous run's writeback) falls on both alike;
# the outputs must be equivalent. Every run's wall, user and system time is kept.
case_() {
  local label=$1 out=$2; shift 2
  # ONLY='regex' runs only the cases whose label matches (e.g. ONLY='-> raw$|-> qcow2$').
  if [ -n "${ONLY:-}" ] && ! [[ $label =~ $ONLY ]]; then return 0; fi
  local qruns=() vruns=() qts=() vts=() qr=0 vr=0 line i
  OUTS=("$W/$out" "$W/vimg-$out")
  for i in $(seq "$REPS"); do
    if ((i % 2)); then
      line=$(once qemu-img convert "$@" "$W/$out"); qruns+=("$line")
      line=$(once "$VIMG" convert "$@" "$W/vimg-$out"); vruns+=("$line")
    else
      line=$(once "$VIMG" convert "$@" "$W/vimg-$out"); vruns+=("$line")
      line=$(once qemu-img convert "$@" "$W/$out"); qruns+=("$line")
    fi
  done
  for line in "${qruns[@]}"; do set -- $line; qts+=("$1"); [ "$4" -gt "$qr" ] && qr=$4; done
  for line in "${vruns[@]}"; do set -- $line; vts+=("$1"); [ "$4" -gt "$vr" ] && vr=$4; done
  # The last run left one output: make the other (untimed) to check and compare them.
  OUTS=()
  local args=("${CASE_ARGS[@]}")
  [ -f "$W/$out" ] || qemu-img convert "${args[@]}" "$W/$out"
  [ -f "$W/vimg-$out" ] || "$VIMG" convert "${args[@]}" "$W/vimg-$out"
  local vsize; vsize=$(du -k "$W/vimg-$out" | cut -f1)
  if [[ $out == *.qcow2 ]]; then
    qemu-img check -q "$W/vimg-$out" || { echo "CHECK FAILED for $label" >&2; exit 1; }
  fi
  local qsize; qsize=$(du -k "$W/$out" | cut -f1)
  qemu-img compare -q "$W/$out" "$W/vimg-$out" || { echo "OUTPUT DIFFERS for $label" >&2; exit 1; }
  rm -f "$W/vimg-$out" "$W/$out"
  # The syscalls of one more run of each (untimed: strace slows them).
  local qsys vsys
  qsys=$(syscall_counts qemu-img convert "${args[@]}" "$W/$out"); rm -f "$W/$out"
  vsys=$(syscall_counts "$VIMG" convert "${args[@]}" "$W/vimg-$out"); rm -f "$W/vimg-$out"
  {
    echo "  $label"
    echo "    qemu-img runs (wall user sys): $(printf '%s; ' "${qruns[@]}" | awk '{gsub(/ [0-9]+;/, ";"); print}')"
    echo "    vimg runs     (wall user sys): $(printf '%s; ' "${vruns[@]}" | awk '{gsub(/ [0-9]+;/, ";"); print}')"
    echo "    medians: qemu-img user $(col_median 2 "${qruns[@]}") s sys $(col_median 3 "${qruns[@]}") s; vimg user $(col_median 2 "${vruns[@]}") s sys $(col_median 3 "${vruns[@]}") s"
  } >>"$W/runs.txt"
  # Medians by position in the round: first (after the other tool's previous round, or
  # nothing) or second (right after the other tool's run).
  local qf=() qs=() vf=() vs=()
  for i in "${!qts[@]}"; do
    if ((i % 2 == 0)); then qf+=("${qts[$i]}"); vs+=("${vts[$i]}"); else qs+=("${qts[$i]}"); vf+=("${vts[$i]}"); fi
  done
  if ((${#qs[@]})); then
    echo "    by position: first in its round qemu-img $(median "${qf[@]}") s, vimg $(median "${vf[@]}") s ($(ratio "$(median "${qf[@]}")" "$(median "${vf[@]}")")); second qemu-img $(median "${qs[@]}") s, vimg $(median "${vs[@]}") s ($(ratio "$(median "${qs[@]}")" "$(median "${vs[@]}")"))" >>"$W/runs.txt"
  fi
  echo "    syscalls, qemu-img: $qsys" >>"$W/runs.txt"
  echo "    syscalls, vimg:     $vsys" >>"$W/runs.txt"
  local qb vb qm vm
  qb=$(best "${qts[@]}"); vb=$(best "${vts[@]}"); qm=$(median "${qts[@]}"); vm=$(median "${vts[@]}")
  printf '%-26s %6ss %6ss %6s %6ss %6ss %6s %5ss %5ss %8s %8s %8s %8s\n' "$label" "$qb" "$vb" \
    "$(ratio "$qb" "$vb")" "$qm" "$vm" "$(ratio "$qm" "$vm")" \
    "$(col_median 3 "${qruns[@]}")" "$(col_median 3 "${vruns[@]}")" "$qr" "$vr" "$qsize" "$vsize"
}

# case_ LABEL OUT ARGS...: ARGS are kept in CASE_ARGS for the untimed runs.
run_case() { CASE_ARGS=("${@:3}"); case_ "$@"; }

: >"$W/runs.txt"
echo "work dir $W ($(df --output=fstype "$W" | tail -1)), $REPS rounds, $(nproc) CPUs, $(uname -r)"
printf '%-26s %7s %7s %6s %7s %7s %6s %6s %6s %8s %8s %8s %8s\n' case q-best v-best ratio q-med v-med ratio q-sys v-sys q-RSS v-RSS q-out v-out
for src in test.raw test.qcow2 test-z.qcow2 test-zstd.qcow2; do
  run_case "$src -> raw" out.raw -O raw "$W/$src"
done
run_case "test.raw -> qcow2" out.qcow2 -O qcow2 "$W/test.raw"
run_case "test.qcow2 -> qcow2" out.qcow2 -O qcow2 "$W/test.qcow2"
run_case "test.raw -> qcow2 -c zlib" out.qcow2 -c -O qcow2 "$W/test.raw"
run_case "test.raw -> qcow2 -c zstd" out.qcow2 -c -O qcow2 -o compression_type=zstd "$W/test.raw"
echo "(ratio = qemu-img time / vimg time, best and median wall time of $REPS runs each, the tools alternating in both orders; sys: median kernel CPU seconds; RSS: peak KiB; out: output KiB on disk)"
echo "each tool's runs, in the order run (odd rounds qemu-img first), CPU medians, medians by position, syscalls of one run:"
cat "$W/runs.txt"
