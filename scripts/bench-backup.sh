#!/usr/bin/env bash
# Times `vimg backup create` and `vimg backup extract` of the 2 GiB benchmark image against
# `vimg convert -O raw` of the same image in the same run (a VMA archive should cost little
# more than a sparse copy), alternating the commands run by run.
# Usage: scripts/bench-backup.sh [WORKDIR]   (default /tmp/vimg-bench; needs ~6 GiB free)
# The image is built by ../shared/bench/make-image.sh when WORKDIR/test.raw does not exist.
# Each command runs REPS times (default 3); best and median wall time and peak RSS are shown.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vimg-bench}
REPS=${REPS:-3}
mkdir -p "$W"
# shared/ lies beside the clone (../shared); from a worktree under wt/, one level further up.
make_image=${MAKE_IMAGE:-$here/../shared/bench/make-image.sh}
[ -f "$make_image" ] || make_image=$here/../../shared/bench/make-image.sh
[ -f "$W/test.raw" ] || bash "$make_image" "$W"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
VIMG=$here/target/release/vimg
[ -f "$W/test.qcow2" ] || qemu-img convert -O qcow2 "$W/test.raw" "$W/test.qcow2"

# One timed run of a command after removing its output: "seconds max-RSS-KiB".
once() {
  local out=$1; shift
  rm -rf "$out"
  sync
  /usr/bin/time -f '%e %M' -o "$W/time.txt" "$@" >/dev/null
  cat "$W/time.txt"
}
best() { printf '%s\n' "$@" | sort -g | head -1; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A T R
run() { # label output command...
  local label=$1 out=$2 t r; shift 2
  read -r t r < <(once "$out" "$@")
  T[$label]="${T[$label]:-} $t"
  [ "${R[$label]:-0}" -ge "$r" ] || R[$label]=$r
}

for src in test.raw test.qcow2; do
  for _ in $(seq "$REPS"); do
    run "convert $src -> raw" "$W/conv.raw" "$VIMG" convert -O raw "$W/$src" "$W/conv.raw"
    run "backup create $src" "$W/b.vma" "$VIMG" backup create -d "drive-scsi0=$W/$src" "$W/b.vma"
    run "backup create --compress zstd $src" "$W/b.vma.zst" "$VIMG" backup create --compress zstd -d "drive-scsi0=$W/$src" "$W/b.vma.zst"
    run "backup extract ($src archive)" "$W/x" "$VIMG" backup extract "$W/b.vma" "$W/x"
    run "backup extract -O qcow2 ($src archive)" "$W/xq" "$VIMG" backup extract -O qcow2 "$W/b.vma" "$W/xq"
    run "backup verify ($src archive)" "$W/none" "$VIMG" backup verify "$W/b.vma"
  done
  # The outputs must be right: the raw restore equals the source, the qcow2 one too.
  cmp "$W/conv.raw" "$W/x/disk-drive-scsi0.raw" || { echo "RESTORE DIFFERS ($src)" >&2; exit 1; }
  qemu-img compare -q "$W/$src" "$W/xq/disk-drive-scsi0.qcow2" || { echo "QCOW2 RESTORE DIFFERS ($src)" >&2; exit 1; }
  qemu-img check -q "$W/xq/disk-drive-scsi0.qcow2" || { echo "QCOW2 RESTORE NOT CLEAN ($src)" >&2; exit 1; }
  printf '%s: archive %s KiB, zstd archive %s KiB, raw copy %s KiB allocated, raw restore %s KiB allocated\n' "$src" \
    "$(du -k --apparent-size "$W/b.vma" | cut -f1)" "$(du -k --apparent-size "$W/b.vma.zst" | cut -f1)" \
    "$(du -k "$W/conv.raw" | cut -f1)" "$(du -k "$W/x/disk-drive-scsi0.raw" | cut -f1)"
  rm -rf "$W/conv.raw" "$W/b.vma" "$W/b.vma.zst" "$W/x" "$W/xq"
done

printf '%-44s %8s %8s %10s\n' case best median peak-RSS
for src in test.raw test.qcow2; do
  for label in "convert $src -> raw" "backup create $src" "backup create --compress zstd $src" \
    "backup extract ($src archive)" "backup extract -O qcow2 ($src archive)" "backup verify ($src archive)"; do
    # shellcheck disable=SC2086
    printf '%-44s %7ss %7ss %9sK\n' "$label" "$(best ${T[$label]})" "$(median ${T[$label]})" "${R[$label]}"
  done
done
echo "(best and median of $REPS runs each, the commands alternating; RSS: peak KiB)"
