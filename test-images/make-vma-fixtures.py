#!/usr/bin/env python3
"""Writes the VMA fixtures of tests/vma/vma_fixtures.rs with a small VMA writer of its own,
written from the reference notes (shared/reference/vma.md) and sharing no code with vimg:

  vma-python.vma      four disks and a VM state stream, two configs; clusters in a shuffled
                      order across devices, extents of 59 entries (the most a reader must
                      accept; Proxmox writes 58), partial masks, all-zero clusters, device
                      sizes that end inside a block
  vma-python.vma.gz   the same archive gzip-compressed (as vzdump's .vma.gz)
  vma-python.json     what the archive holds: sha256 of every device and config, and the
                      `list` output in UTC

Deterministic: same bytes on every run (fixed uuid, ctime, seed, gzip mtime).
Usage: python3 test-images/make-vma-fixtures.py   (writes next to itself)
"""
import gzip
import hashlib
import json
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
UUID = bytes.fromhex("5a0c9f4e2b6d4a81937e1c2d3b4a5f60")
CTIME = 1700000000
CLUSTER = 65536
BLOCK = 4096

rng = random.Random(20261201)


def device_data(size, style):
    out = bytearray(size)
    for b in range(0, size, BLOCK):
        kind = rng.randrange(4) if style == "mixed" else 3
        n = min(BLOCK, size - b)
        if kind == 0 or kind == 1:
            continue  # zero block
        if kind == 2:
            out[b:b + n] = bytes([rng.randrange(1, 256)]) * n
        else:
            out[b:b + n] = bytes(rng.randrange(256) for _ in range(n))
    # an all-zero cluster in the middle, when there is room
    if size > 3 * CLUSTER:
        out[CLUSTER:2 * CLUSTER] = bytes(CLUSTER)
    return bytes(out)


def sparse_data(size):
    out = bytearray(size)
    for b in (3 * BLOCK, 40 * CLUSTER + 5 * BLOCK, size - 512):
        out[b:b + 512] = bytes(rng.randrange(1, 256) for _ in range(512))
    return bytes(out)


devices = [
    ("drive-scsi0", device_data(5 * CLUSTER + 3 * 512, "mixed")),
    ("drive-virtio1", device_data(3 * CLUSTER, "mixed")),
    ("drive-efidisk0", device_data(528 * 512 // 4, "mixed")),  # 67584 bytes
    ("drive-sata2", sparse_data(100 * CLUSTER - 512)),
    ("vmstate", device_data(CLUSTER + BLOCK, "random")),
]
configs = [
    ("qemu-server.conf", b"boot: order=scsi0\ncores: 2\nmemory: 1024\nscsi0: local:100/vm-100-disk-0.qcow2\n"),
    ("qemu-server.fw", b"[OPTIONS]\nenable: 1\n"),
]

# Blob buffer: byte 0 unused; LE u16 length, then the bytes (names end with NUL).
blob = bytearray(b"\0")


def put(data):
    at = len(blob)
    blob.extend(struct.pack("<H", len(data)))
    blob.extend(data)
    return at


head = bytearray(12288)
cfg_ptrs = [(put(n.encode() + b"\0"), put(d)) for n, d in configs]
dev_ptrs = [put(n.encode() + b"\0") for n, _ in devices]
header_size = 12288 + (len(blob) + 511) // 512 * 512
head[0:4] = b"VMA\0"
struct.pack_into(">I", head, 4, 1)
head[8:24] = UUID
struct.pack_into(">q", head, 24, CTIME)
struct.pack_into(">III", head, 48, 12288, len(blob), header_size)
for i, (n, d) in enumerate(cfg_ptrs):
    struct.pack_into(">I", head, 2044 + 4 * i, n)
    struct.pack_into(">I", head, 3068 + 4 * i, d)
for i, ((_, data), ptr) in enumerate(zip(devices, dev_ptrs)):
    dev_id = i + 1
    struct.pack_into(">IIQ", head, 4096 + 32 * dev_id, ptr, 0, len(data))
full = bytearray(header_size)
full[:12288] = head
full[12288:12288 + len(blob)] = blob
full[32:48] = hashlib.md5(bytes(full)).digest()

# Clusters: the disks shuffled together; the VM state in order, as Proxmox streams it.
order = [(i + 1, c) for i, (_, d) in enumerate(devices[:4]) for c in range((len(d) + CLUSTER - 1) // CLUSTER)]
rng.shuffle(order)
vm_id = len(devices)
order += [(vm_id, c) for c in range((len(devices[-1][1]) + CLUSTER - 1) // CLUSTER)]


def extent(entries):
    infos, data = [], bytearray()
    for dev_id, c in entries:
        dev = devices[dev_id - 1][1]
        mask = 0
        for j in range(16):
            start = c * CLUSTER + j * BLOCK
            if start >= len(dev):
                break
            block = dev[start:start + BLOCK]
            if any(block):
                mask |= 1 << j
                data.extend(block.ljust(BLOCK, b"\0"))
        infos.append(mask << 48 | dev_id << 32 | c)
    h = bytearray(512)
    h[0:4] = b"VMAE"
    struct.pack_into(">H", h, 6, len(data) // BLOCK)
    h[8:24] = UUID
    for i, v in enumerate(infos):
        struct.pack_into(">Q", h, 40 + 8 * i, v)
    h[24:40] = hashlib.md5(bytes(h)).digest()
    return bytes(h) + bytes(data)


archive = bytearray(full)
for i in range(0, len(order), 59):
    archive += extent(order[i:i + 59])

with open(os.path.join(HERE, "vma-python.vma"), "wb") as f:
    f.write(archive)
with open(os.path.join(HERE, "vma-python.vma.gz"), "wb") as f:
    f.write(gzip.compress(bytes(archive), mtime=0))

listing = "".join("CFG: size: %d name: %s\n" % (len(d), n) for n, d in configs)
for i, (n, d) in enumerate(devices):
    if n == "vmstate":
        listing += "VMSTATE: dev_id=%d memory: %d\n" % (i + 1, len(d))
    else:
        listing += "DEV: dev_id=%d size: %d devname: %s\n" % (i + 1, len(d), n)
listing += "CTIME: Tue Nov 14 22:13:20 2023\n"
manifest = {
    "list_utc": listing,
    "devices": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in devices},
    "configs": {n: hashlib.sha256(d).hexdigest() for n, d in configs},
}
with open(os.path.join(HERE, "vma-python.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
print("wrote vma-python.vma (%d bytes), vma-python.vma.gz, vma-python.json" % len(archive))
