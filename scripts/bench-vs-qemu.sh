#!/usr/bin/env bash
# Times vimg against qemu-img on the same images in one run, and prints ratios.
# Usage: scripts/bench-vs-qemu.sh [WORKDIR]   (default /tmp/vimg-bench; needs ~8 GiB free)
# The source image is built by ../shared/bench/make-image.sh (a 2 GiB ext4 disk image) when
# WORKDIR/test.raw does not exist yet. Each command runs REPS times (default 10); the best wall
# time and the peak RSS (from /usr/bin/time) are reported. ONLY='regex' picks cases by label.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vimg-bench}
REPS=${REPS:-10}
mkdir -p "$W"
[ -f "$W/test.raw" ] || bash "$here/../shared/bench/make-image.sh" "$W"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
VIMG=$here/target/release/vimg
[ -f "$W/test.qcow2" ] || qemu-img convert -O qcow2 "$W/test.raw" "$W/test.qcow2"
[ -f "$W/test-z.qcow2" ] || qemu-img convert -c -O qcow2 "$W/test.raw" "$W/test-z.qcow2"
[ -f "$W/test-zstd.qcow2" ] || qemu-img convert -c -O qcow2 -o compression_type=zstd "$W/test.raw" "$W/test-zstd.qcow2"

# One timed run: wall seconds and max RSS KiB of a command. Both tools' outputs of the case
# (OUTS) are removed first, so that every run starts from the same state whichever tool ran
# before: on this machine a run that follows the other tool's, with that output still cached
# and its own older one just deleted, was up to 10x slower than one that follows its own.
once() {
  rm -f "${OUTS[@]}"
  sync
  sleep 1
  /usr/bin/time -f '%e %M' -o "$W/time.txt" "$@" >/dev/null
  cat "$W/time.txt"
}

# best and median of a list of numbers
best() { printf '%s\n' "$@" | sort -g | head -1; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# One case: the same convert arguments for both tools, REPS times each, alternating and in
# both orders (qemu-img first in odd rounds, vimg first in even ones), so that the machine's
# drifting state (page cache, host memory, the previous run's writeback) falls on both alike;
# the outputs must be equivalent.
case_() {
  local label=$1 out=$2; shift 2
  # ONLY='regex' runs only the cases whose label matches (e.g. ONLY='-> raw$|-> qcow2$').
  if [ -n "${ONLY:-}" ] && ! [[ $label =~ $ONLY ]]; then return 0; fi
  local qts=() vts=() qr=0 vr=0 t r i
  OUTS=("$W/$out" "$W/vimg-$out")
  for i in $(seq "$REPS"); do
    if ((i % 2)); then
      read -r t r < <(once qemu-img convert "$@" "$W/$out"); qts+=("$t"); [ "$r" -gt "$qr" ] && qr=$r
      read -r t r < <(once "$VIMG" convert "$@" "$W/vimg-$out"); vts+=("$t"); [ "$r" -gt "$vr" ] && vr=$r
    else
      read -r t r < <(once "$VIMG" convert "$@" "$W/vimg-$out"); vts+=("$t"); [ "$r" -gt "$vr" ] && vr=$r
      read -r t r < <(once qemu-img convert "$@" "$W/$out"); qts+=("$t"); [ "$r" -gt "$qr" ] && qr=$r
    fi
  done
  # The last run left one output: make the other (untimed) to check and compare them.
  [ -f "$W/$out" ] || qemu-img convert "$@" "$W/$out"
  [ -f "$W/vimg-$out" ] || "$VIMG" convert "$@" "$W/vimg-$out"
  local vsize; vsize=$(du -k "$W/vimg-$out" | cut -f1)
  if [[ $out == *.qcow2 ]]; then
    qemu-img check -q "$W/vimg-$out" || { echo "CHECK FAILED for $label" >&2; exit 1; }
  fi
  local qsize; qsize=$(du -k "$W/$out" | cut -f1)
  qemu-img compare -q "$W/$out" "$W/vimg-$out" || { echo "OUTPUT DIFFERS for $label" >&2; exit 1; }
  rm -f "$W/vimg-$out" "$W/$out"
  echo "  $label: qemu-img runs ${qts[*]}; vimg runs ${vts[*]}" >>"$W/runs.txt"
  # Medians by what ran just before: the same tool (first in a round: qemu-img's odd rounds,
  # vimg's even ones) or the other one.
  local qs=() qo=() vs=() vo=()
  for i in "${!qts[@]}"; do
    if ((i % 2 == 0)); then qs+=("${qts[$i]}"); vo+=("${vts[$i]}"); else qo+=("${qts[$i]}"); vs+=("${vts[$i]}"); fi
  done
  if ((${#qo[@]})); then
    echo "    after itself: qemu-img $(median "${qs[@]}") s, vimg $(median "${vs[@]}") s ($(awk "BEGIN{printf \"%.2fx\", $(median "${qs[@]}") / $(median "${vs[@]}")}")); after the other: qemu-img $(median "${qo[@]}") s, vimg $(median "${vo[@]}") s ($(awk "BEGIN{printf \"%.2fx\", $(median "${qo[@]}") / $(median "${vo[@]}")}"))" >>"$W/runs.txt"
  fi
  local qb vb qm vm
  qb=$(best "${qts[@]}"); vb=$(best "${vts[@]}"); qm=$(median "${qts[@]}"); vm=$(median "${vts[@]}")
  printf '%-28s %7ss %7ss %6s %7ss %7ss %6s %9s %9s %9s %9s\n' "$label" "$qb" "$vb" \
    "$(awk "BEGIN{printf \"%.2fx\", $qb / ($vb > 0 ? $vb : 0.001)}")" "$qm" "$vm" \
    "$(awk "BEGIN{printf \"%.2fx\", $qm / ($vm > 0 ? $vm : 0.001)}")" "$qr" "$vr" "$qsize" "$vsize"
}

: >"$W/runs.txt"
printf '%-28s %8s %8s %6s %8s %8s %6s %9s %9s %9s %9s\n' case qemu-best vimg-best ratio qemu-med vimg-med ratio qemu-RSS vimg-RSS qemu-out vimg-out
for src in test.raw test.qcow2 test-z.qcow2 test-zstd.qcow2; do
  case_ "$src -> raw" out.raw -O raw "$W/$src"
done
case_ "test.raw -> qcow2" out.qcow2 -O qcow2 "$W/test.raw"
case_ "test.qcow2 -> qcow2" out.qcow2 -O qcow2 "$W/test.qcow2"
case_ "test.raw -> qcow2 -c zlib" out.qcow2 -c -O qcow2 "$W/test.raw"
case_ "test.raw -> qcow2 -c zstd" out.qcow2 -c -O qcow2 -o compression_type=zstd "$W/test.raw"
echo "(ratio = qemu-img time / vimg time, best and median of $REPS runs each, the tools alternating in both orders; RSS: peak KiB; out: output KiB on disk)"
echo "each tool's runs, in the order run (odd rounds qemu-img first):"
cat "$W/runs.txt"
