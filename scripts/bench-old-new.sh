#!/usr/bin/env bash
# Times two vimg binaries against each other (an old build and a new one) on the same converts,
# alternating in both orders, and prints best, median and every run of each: the check that a
# change costs nothing, where bench-vs-qemu.sh's ratios move with qemu-img's bimodal times.
#
# usage: scripts/bench-old-new.sh OLD_VIMG NEW_VIMG [WORKDIR]   (env: ROUNDS, default 12)
# WORKDIR (default /tmp/vimg-bench) must hold bench-vs-qemu.sh's test.qcow2 and test-zstd.qcow2.
set -euo pipefail
OLD=${1:?old vimg binary}; NEW=${2:?new vimg binary}; W=${3:-/tmp/vimg-bench}
ROUNDS=${ROUNDS:-12}
run() {
  rm -f "$W/on-out"; sync; sleep 1
  /usr/bin/time -f %e -o "$W/on-t" "$1" convert "${@:2}" "$W/on-out" >/dev/null
  cat "$W/on-t"
}
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2)}'; }
best() { printf '%s\n' "$@" | sort -g | head -1; }
for c in "-O qcow2 $W/test.qcow2" "-O raw $W/test.qcow2" "-O raw $W/test-zstd.qcow2"; do
  o=(); n=()
  for i in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086
    if ((i % 2)); then o+=("$(run "$OLD" $c)"); n+=("$(run "$NEW" $c)")
    else n+=("$(run "$NEW" $c)"); o+=("$(run "$OLD" $c)"); fi
  done
  echo "convert $c: old best $(best "${o[@]}") med $(med "${o[@]}") | new best $(best "${n[@]}") med $(med "${n[@]}")"
  echo "   old runs: ${o[*]}"
  echo "   new runs: ${n[*]}"
done
rm -f "$W/on-out" "$W/on-t"
