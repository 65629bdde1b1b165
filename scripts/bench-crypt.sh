#!/usr/bin/env bash
# Times vimg against qemu-img on LUKS-encrypted qcow2 images in one run (issue 16), and prints
# best, median and every run of each tool, the ratios qemu-img/vimg and the peak RSS.
#
# usage: scripts/bench-crypt.sh [WORKDIR]   (default /tmp/vimg-bench, shared with
#        bench-vs-qemu.sh; needs ~9 GiB free)
# env:   REPS (default 10) rounds per case, each round one run of each tool;
#        ONLY='regex' runs only the cases whose label matches;
#        VIMG (default: this tree's target/release/vimg, built first);
#        BASE=/path/to/an/older/vimg times that build in qemu-img's place (the check that a
#        change helps; the columns still say qemu).
#
# The source is ../shared/bench/make-image.sh's 2 GiB ext4 disk image (WORKDIR/test.raw, built
# once and kept), and its LUKS qcow2 (WORKDIR/test-luks.qcow2, aes-256-xts-plain64, made once by
# qemu-img). The passphrase is the secret object `s`.
#
# Cases:
#   raw -> luks qcow2          convert -O qcow2 -o encrypt.format=luks,...  (each tool creates
#                              its target: qemu-img calibrates PBKDF2 for about 2 s whatever
#                              encrypt.iter-time says)
#   luks qcow2 -> raw          convert --image-opts ... -O raw
#   luks qcow2 -> luks qcow2   convert --image-opts ... -O qcow2 -o ...,encrypt.cipher-alg=aes-256,
#                              encrypt.cipher-mode=xts
#   ... -n (data path)         the two writing cases again with convert -n into a target made
#                              beforehand by qemu-img create (copied fresh before every run, not
#                              timed), so that the time is the copy's alone.
#
# Fairness, the same for both tools before every timed run: both tools' outputs removed (and the
# -n target copied fresh), sync, 1 s of quiet; the tools alternate in both orders (qemu-img first
# in odd rounds, vimg first in even ones). The page cache is not dropped.
# Each tool's last output is checked against test.raw with qemu-img compare (with the secret)
# and, for qcow2, qemu-img check. A case vimg refuses (an option it does not support) is
# reported as such, with its message, and the other cases go on.
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
A=${BASE:-qemu-img}
SECRET=(--object secret,id=s,data=vimg-bench-pw)
LUKS=encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10
XTS=$LUKS,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts
opts() { echo "driver=qcow2,file.filename=$1,encrypt.key-secret=s"; }
if [ ! -f "$W/test-luks.qcow2" ]; then
  qemu-img convert "${SECRET[@]}" -O qcow2 -o "$LUKS" "$W/test.raw" "$W/test-luks.qcow2.part"
  mv "$W/test-luks.qcow2.part" "$W/test-luks.qcow2"
fi
SIZE=$(stat -c %s "$W/test.raw")
# The empty LUKS qcow2 the -n cases copy before each run.
rm -f "$W/crypt-empty.qcow2"
qemu-img create -q -f qcow2 "${SECRET[@]}" -o "$LUKS" "$W/crypt-empty.qcow2" "$SIZE"
trap 'rm -f "$W/crypt-q.out" "$W/crypt-v.out" "$W/crypt-empty.qcow2" "$W/crypt-time.txt" "$W/crypt-err.txt"' EXIT

# One timed run: prints wall seconds, peak RSS KiB and the exit status.
once() {
  local rc=0
  /usr/bin/time -f '%e %M' -o "$W/crypt-time.txt" "$@" >/dev/null 2>"$W/crypt-err.txt" || rc=$?
  echo "$(cat "$W/crypt-time.txt" | tail -1) $rc"
}

# The arguments of a case for one tool: @OUT@ in them replaced by that tool's output.
with_out() {
  local out=$1 a; shift
  for a in "$@"; do printf '%s\0' "${a//@OUT@/$out}"; done
}

: >"$W/crypt-runs.txt"
# case_ LABEL KIND FORMAT ARGS...: KIND is new (each tool creates @OUT@) or fresh (@OUT@ is a
# copy of the empty LUKS target made before each run); FORMAT is the output's: raw or luks.
case_() {
  local label=$1 kind=$2 fmt=$3; shift 3
  if [ -n "${ONLY:-}" ] && ! [[ $label =~ $ONLY ]]; then return 0; fi
  local qargs=() vargs=()
  mapfile -d '' qargs < <(with_out "$W/crypt-q.out" "$@")
  mapfile -d '' vargs < <(with_out "$W/crypt-v.out" "$@")
  local qts=() vts=() qrs=() vrs=() rr=() t r rc i line="" refused=""
  for i in $(seq "$REPS"); do
    local order tool
    if ((i % 2)); then order="A V"; else order="V A"; fi
    for tool in $order; do
      [ "$tool" = V ] && [ -n "$refused" ] && continue
      rm -f "$W/crypt-q.out" "$W/crypt-v.out"
      if [ "$kind" = fresh ]; then
        cp --sparse=always "$W/crypt-empty.qcow2" "$W/crypt-$( [ "$tool" = A ] && echo q || echo v).out"
      fi
      sync
      sleep 1
      if [ "$tool" = A ]; then
        read -r t r rc < <(once "$A" convert "${qargs[@]}")
        [ "$rc" = 0 ] || { echo "$A FAILED for $label: $(cat "$W/crypt-err.txt")" >&2; exit 1; }
        qts+=("$t"); qrs+=("$r")
      else
        read -r t r rc < <(once "$VIMG" convert "${vargs[@]}")
        if [ "$rc" != 0 ]; then
          refused="$(head -1 "$W/crypt-err.txt")"
          continue
        fi
        vts+=("$t"); vrs+=("$r")
      fi
    done
    if [ -z "$refused" ]; then
      rr+=("$(ratio "${qts[-1]}" "${vts[-1]}")")
      line+=" | ${i}:$( ((i % 2)) && echo "q ${qts[-1]} v ${vts[-1]}" || echo "v ${vts[-1]} q ${qts[-1]}") (${rr[-1]})"
    else
      line+=" | ${i}:q ${qts[-1]}"
    fi
  done
  # Each tool's output (the last round left both, as above) checked against the source.
  local out
  for out in "$W/crypt-q.out" "$W/crypt-v.out"; do
    [ -f "$out" ] || continue
    [ "$out" = "$W/crypt-v.out" ] && [ -n "$refused" ] && continue
    if [ "$fmt" = luks ]; then
      qemu-img check -q "${SECRET[@]}" --image-opts "$(opts "$out")" ||
        { echo "CHECK FAILED for $label ($out)" >&2; exit 1; }
      qemu-img compare -q "${SECRET[@]}" --image-opts "driver=raw,file.filename=$W/test.raw" "$(opts "$out")" ||
        { echo "OUTPUT DIFFERS for $label ($out)" >&2; exit 1; }
    else
      qemu-img compare -q -f raw -F raw "$W/test.raw" "$out" ||
        { echo "OUTPUT DIFFERS for $label ($out)" >&2; exit 1; }
    fi
  done
  rm -f "$W/crypt-q.out" "$W/crypt-v.out"
  local qb qm qr
  qb=$(best "${qts[@]}"); qm=$(median "${qts[@]}"); qr=$(printf '%s\n' "${qrs[@]}" | sort -g | tail -1)
  if [ -n "$refused" ]; then
    printf '%-34s %7ss %8s %6s %7ss %8s %6s %7s %8s %8s\n' "$label" "$qb" - - "$qm" - - - "$qr" -
    echo "  $label: vimg refused: $refused" >>"$W/crypt-runs.txt"
  else
    local vb vm vr rnum=()
    vb=$(best "${vts[@]}"); vm=$(median "${vts[@]}"); vr=$(printf '%s\n' "${vrs[@]}" | sort -g | tail -1)
    for r in "${rr[@]}"; do rnum+=("${r%x}"); done
    printf '%-34s %7ss %7ss %6s %7ss %7ss %6s %7s %8s %8s %6s\n' "$label" "$qb" "$vb" "$(ratio "$qb" "$vb")" \
      "$qm" "$vm" "$(ratio "$qm" "$vm")" "$(ratio "$(median "${rnum[@]}")" 1)" "$qr" "$vr" "$(ratio "$qr" "$vr")"
  fi
  {
    echo "  $label (round: order, seconds, qemu-img/vimg)$line"
    echo "    peak RSS KiB qemu-img ${qrs[*]}; vimg ${vrs[*]:-}"
  } >>"$W/crypt-runs.txt"
}

echo "source $W/test.raw ($SIZE bytes), $REPS rounds per case, vimg $VIMG against $A"
printf '%-34s %8s %8s %6s %8s %8s %6s %7s %8s %8s %6s\n' case qemu-best vimg-best ratio qemu-med vimg-med ratio rnd-med qemu-RSS vimg-RSS RSS
case_ "raw -> luks qcow2" new luks "${SECRET[@]}" -O qcow2 -o "$LUKS" "$W/test.raw" @OUT@
case_ "luks qcow2 -> raw" new raw "${SECRET[@]}" --image-opts "$(opts "$W/test-luks.qcow2")" -O raw @OUT@
case_ "luks qcow2 -> luks qcow2 (xts)" new luks "${SECRET[@]}" --image-opts "$(opts "$W/test-luks.qcow2")" -O qcow2 -o "$XTS" @OUT@
case_ "raw -> luks qcow2 -n" fresh luks "${SECRET[@]}" -n -f raw "$W/test.raw" --target-image-opts "$(opts @OUT@)"
case_ "luks qcow2 -> luks qcow2 -n" fresh luks "${SECRET[@]}" -n --image-opts "$(opts "$W/test-luks.qcow2")" --target-image-opts "$(opts @OUT@)"
echo "(ratio = qemu-img time / vimg time: of the best runs, of the medians, and the median of each round's ratio; RSS: peak KiB over all runs, and qemu-img's / vimg's)"
echo "every run:"
cat "$W/crypt-runs.txt"
