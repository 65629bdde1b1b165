#!/usr/bin/env bash
# Makes test-images/sample.qcow2, the small image the README's first command works on: a 64 MiB
# qcow2 v3 disk with 4 KiB clusters and zstd compression, holding plain data, compressed
# clusters, zero clusters, one internal snapshot and unallocated space (about 100 KiB on disk).
# Needs qemu-img and qemu-io.
set -euo pipefail
cd "$(dirname "$0")"
rm -f sample.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096,compression_type=zstd sample.qcow2 64M
qemu-io -f qcow2 \
  -c 'write -c -P 0x61 0 4k' -c 'write -c -P 0x62 4k 4k' -c 'write -c -P 0x63 1M 4k' \
  -c 'write -P 0x11 64k 32k' -c 'write -P 0x22 8M 16k' \
  -c 'write -z 8200k 8k' -c 'write -P 0x33 63M 4k' sample.qcow2 >/dev/null
qemu-img snapshot -c before-upgrade sample.qcow2
qemu-io -f qcow2 -c 'write -P 0x44 64k 8k' sample.qcow2 >/dev/null
qemu-img check -q sample.qcow2
ls -l sample.qcow2
