#!/usr/bin/env bash
# Guest write cost of a live backup: `qemu-img bench -w` over NBD (a Unix socket) against
#  - vimg serve, no backup;
#  - vimg serve during a vimg push backup (backup create --server, VMA to a file);
#  - qemu-storage-daemon (NBD export of the same qcow2), no backup;
#  - qemu-storage-daemon during blockdev-backup sync=full to a raw file.
# Two benches per case: latency (4 KiB writes, one in flight, each in a new 64 KiB cluster, so
# that every write meets a cluster the backup has not copied yet) and throughput (1 MiB writes,
# 4 in flight). Each case starts from a fresh copy of a SIZE qcow2 filled with data, and prints
# the bench's time, the backup's own time and whether the bench ended before the backup did.
# Usage: scripts/bench-live-backup.sh [WORKDIR]   (default /tmp/vimg-bench-live; needs ~3*SIZE)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vimg-bench-live}
SIZE_MB=${SIZE_MB:-1024}
mkdir -p "$W"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
VIMG=$here/target/release/vimg
LAT_COUNT=$((SIZE_MB * 16))     # 4 KiB every 64 KiB over the whole disk
TPUT_COUNT=$((SIZE_MB / 2))     # 1 MiB writes over half the disk

if [ ! -f "$W/base.qcow2" ]; then
  qemu-img create -q -f qcow2 "$W/base.qcow2" "${SIZE_MB}M"
  qemu-io -f qcow2 -c "write -P 0xaa 0 ${SIZE_MB}M" "$W/base.qcow2" >/dev/null
fi

now() { date +%s.%N; }
secs() { awk "BEGIN{printf \"%.2f\", $2 - $1}"; }

wait_socket() {
  for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "no socket $1" >&2; exit 1
}

# bench KIND URI: runs one bench; prints its seconds.
bench() {
  local out
  if [ "$1" = lat ]; then
    out=$(qemu-img bench -w -f raw -c "$LAT_COUNT" -d 1 -s 4k -S 64k "$2")
  else
    out=$(qemu-img bench -w -f raw -c "$TPUT_COUNT" -d 4 -s 1M "$2")
  fi
  echo "$out" | sed -n 's/.*completed in \([0-9.]*\) seconds.*/\1/p'
}

report() { # name kind secs backup_secs overlap
  echo "$1|$2|$3|$4" >> "$W/records"
  local per ops
  if [ "$2" = lat ]; then
    per=$(awk "BEGIN{printf \"%.1f us/write\", $3 * 1e6 / $LAT_COUNT}")
    ops=$(awk "BEGIN{printf \"%.0f writes/s\", $LAT_COUNT / $3}")
  else
    per=$(awk "BEGIN{printf \"%.1f ms/write\", $3 * 1e3 / $TPUT_COUNT}")
    ops=$(awk "BEGIN{printf \"%.0f MiB/s\", $TPUT_COUNT / $3}")
  fi
  printf '%-22s %-5s %7.2f s  %-16s %-14s backup %s s%s\n' "$1" "$2" "$3" "$per" "$ops" "$4" "$5"
}

vimg_case() { # KIND BACKUP(0|1)
  rm -f "$W"/*.sock "$W/disk.qcow2" "$W/a.vma"
  cp "$W/base.qcow2" "$W/disk.qcow2"
  sync
  "$VIMG" serve -k "$W/nbd.sock" --control "$W/ctl.sock" -e 0 -x d -f qcow2 "$W/disk.qcow2" &
  local srv=$! bpid= t0 t1 tb="-" overlap=""
  wait_socket "$W/ctl.sock"
  local uri="nbd+unix:///d?socket=$W/nbd.sock"
  if [ "$2" = 1 ]; then
    t0=$(now)
    ( "$VIMG" backup create --server "$W/ctl.sock" "$W/a.vma" d; echo "$(now)" > "$W/backup.end" ) &
    bpid=$!
    until "$VIMG" control "$W/ctl.sock" query-jobs | grep -q running; do sleep 0.01; done
  fi
  local s; s=$(bench "$1" "$uri")
  if [ -n "$bpid" ]; then
    [ -f "$W/backup.end" ] || overlap=" (bench ended first)"
    wait "$bpid"
    tb=$(secs "$t0" "$(cat "$W/backup.end")"); rm -f "$W/backup.end"
    "$VIMG" backup verify "$W/a.vma" >/dev/null
  fi
  kill "$srv"; wait "$srv" || true
  qemu-img check -q "$W/disk.qcow2"
  report "vimg$([ "$2" = 1 ] && echo ' + push backup')" "$1" "$s" "$tb" "$overlap"
}

qsd_case() { # KIND BACKUP(0|1)
  rm -f "$W"/*.sock "$W/disk.qcow2" "$W/target.raw"
  cp "$W/base.qcow2" "$W/disk.qcow2"
  sync
  qemu-storage-daemon \
    --blockdev driver=file,filename="$W/disk.qcow2",node-name=file0 \
    --blockdev driver=qcow2,file=file0,node-name=disk0 \
    --nbd-server addr.type=unix,addr.path="$W/nbd.sock" \
    --export type=nbd,id=e0,node-name=disk0,name=d,writable=on \
    --chardev socket,path="$W/qmp.sock",server=on,wait=off,id=qmp0 --monitor chardev=qmp0 &
  local srv=$! t0 tb="-" overlap="" bpid=
  wait_socket "$W/qmp.sock"; wait_socket "$W/nbd.sock"
  local uri="nbd+unix:///d?socket=$W/nbd.sock"
  if [ "$2" = 1 ]; then
    qemu-img create -q -f raw "$W/target.raw" "${SIZE_MB}M"
    "$VIMG" control "$W/qmp.sock" blockdev-add \
      "{\"driver\":\"raw\",\"node-name\":\"tgt\",\"file\":{\"driver\":\"file\",\"filename\":\"$W/target.raw\"}}" >/dev/null
    t0=$(now)
    "$VIMG" control "$W/qmp.sock" blockdev-backup \
      '{"job-id":"b0","device":"disk0","target":"tgt","sync":"full"}' >/dev/null
    ( while out=$("$VIMG" control "$W/qmp.sock" query-jobs) && echo "$out" | grep -q '"b0"' &&
          ! echo "$out" | grep -q '"concluded"'; do sleep 0.05; done
      echo "$(now)" > "$W/backup.end" ) &
    bpid=$!
  fi
  local s; s=$(bench "$1" "$uri")
  if [ -n "$bpid" ]; then
    [ -f "$W/backup.end" ] || overlap=" (bench ended first)"
    wait "$bpid"
    tb=$(secs "$t0" "$(cat "$W/backup.end")"); rm -f "$W/backup.end"
  fi
  kill "$srv"; wait "$srv" || true
  qemu-img check -q "$W/disk.qcow2"
  report "qsd$([ "$2" = 1 ] && echo ' + blockdev-backup')" "$1" "$s" "$tb" "$overlap"
}

REPS=${REPS:-3}
rm -f "$W/records"
echo "disk ${SIZE_MB} MiB qcow2 (all data), $(nproc) CPUs, $REPS rounds; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$REPS"); do
  for kind in lat tput; do
    vimg_case "$kind" 0
    vimg_case "$kind" 1
    qsd_case "$kind" 0
    qsd_case "$kind" 1
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "medians (bench seconds, backup seconds):"
for kind in lat tput; do
  for name in "vimg" "vimg + push backup" "qsd" "qsd + blockdev-backup"; do
    b=$(awk -F'|' -v n="$name" -v k="$kind" '$1==n && $2==k {print $3}' "$W/records" | sort -g |
      awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
    j=$(awk -F'|' -v n="$name" -v k="$kind" '$1==n && $2==k && $4!="-" {print $4}' "$W/records" | sort -g |
      awk '{a[NR]=$1} END{if (NR) print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2); else print "-"}')
    report "$name" "$kind" "$b" "$j" "" | sed 's/^/  /'
  done
done
