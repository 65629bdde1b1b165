#!/usr/bin/env python3
"""make-corrupt.py: regenerate the corruption corpus (test-images/corrupt/) and its manifest.

README
======
Run from anywhere: `python3 test-images/corrupt/make-corrupt.py`. Needs qemu-img and qemu-io
(checked against 10.0.2). Every image starts as a small valid image made by qemu's own tools
(512-byte clusters, so most files are a few KiB and are committed as they are), which is then
damaged by patching bytes: one image per kind of damage qemu's iotests 060, 080, 108, 138,
220 and 261 describe (their test titles name the damage; no qemu code or data is copied), plus
the other kinds issue 6 lists (backing chains that loop, unknown incompatible features, ...).

Every file in the directory except this script is rewritten. manifest.json holds one entry per
image:

  name, file              the image (relative to test-images/corrupt/); `extra` lists other
                          files the case needs (backing files), `extend_to` a length the test
                          extends the file to (sparse) before using it, for damage that needs a
                          huge file (iotest 138)
  iotest, damage          where the damage comes from and what it is
  expect                  what vimg must do, per operation, on a fresh copy of the image:
     info                 `vimg info IMG`
     check                `vimg check IMG` (exit code)
     repair               `vimg check -r all IMG` (exit code; 0 = repaired clean, then
                          `qemu-img check` must find no corruption either)
     convert              `vimg convert -O raw IMG out`
     write                `vimg convert -n -O qcow2 pattern.raw IMG` (a 64 KiB write at 0)
                          each "ok", "error" (a one-line vimg error, exit 1) or
                          "error:TEXT" (an error containing TEXT); check and repair are exit
                          codes (0 clean, 1 incomplete/cannot open, 2 corrupt, 3 leaks)
  qemu                    what qemu-img 10 does, recorded here: info_exit, check_exit,
                          check_first_line (its first line of output on stderr or stdout)
  verdict_differs         set where vimg's check verdict class knowingly differs from qemu's,
                          with the reason

The expectations are written below with each case; the script only records qemu's behaviour.
tests/corrupt_corpus/corruption_corpus.rs runs every entry under a memory limit and a timeout.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
QFI = b"QFI\xfb"
L1_MASK = 0x00FFFFFFFFFFFE00


def run(args, timeout=20, cwd=None):
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return 124, "", "timed out"


def must(args, cwd=None):
    code, out, err = run(args, cwd=cwd)
    if code != 0:
        sys.exit(f"make-corrupt.py: {' '.join(args)} failed: {out}{err}")
    return out


class Img:
    """A qcow2 file held in memory, with accessors for the structures the cases damage."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.b = bytearray(f.read())

    def u16(self, o):
        return struct.unpack_from(">H", self.b, o)[0]

    def u32(self, o):
        return struct.unpack_from(">I", self.b, o)[0]

    def u64(self, o):
        return struct.unpack_from(">Q", self.b, o)[0]

    def put16(self, o, v):
        struct.pack_into(">H", self.b, o, v & 0xFFFF)

    def put32(self, o, v):
        struct.pack_into(">I", self.b, o, v & 0xFFFFFFFF)

    def put64(self, o, v):
        struct.pack_into(">Q", self.b, o, v & 0xFFFFFFFFFFFFFFFF)

    # header fields
    cluster_bits = property(lambda s: s.u32(20))
    cs = property(lambda s: 1 << s.u32(20))
    l1_size = property(lambda s: s.u32(36))
    l1 = property(lambda s: s.u64(40))
    rt = property(lambda s: s.u64(48))
    rt_clusters = property(lambda s: s.u32(56))
    nb_snapshots = property(lambda s: s.u32(60))
    snapshots = property(lambda s: s.u64(64))
    header_length = property(lambda s: s.u32(100))

    def refcount_order(self):
        return self.u32(96) if self.u32(4) >= 3 else 4

    def l1_entry(self, i):
        return self.l1 + 8 * i

    def l2_table(self, guest):
        """Host offset of the L2 table covering guest offset `guest`."""
        per = self.cs // 8
        e = self.u64(self.l1_entry((guest // self.cs) // per))
        assert e & L1_MASK, "no L2 table there"
        return e & L1_MASK

    def l2_entry(self, guest):
        per = self.cs // 8
        return self.l2_table(guest) + 8 * ((guest // self.cs) % per)

    def refblock(self, i):
        return self.u64(self.rt + 8 * i) & ~0x1FF

    def set_refcount(self, cluster, value):
        bits = 1 << self.refcount_order()
        per = self.cs * 8 // bits
        blk = self.refblock(cluster // per)
        assert blk, "no refcount block"
        assert bits == 16, "only 16-bit refcounts are poked here"
        self.put16(blk + 2 * (cluster % per), value)

    def snapshot_entry(self, i):
        """File offset of snapshot table entry `i`."""
        off = self.snapshots
        for _ in range(i):
            extra = self.u32(off + 36)
            id_len, name_len = self.u16(off + 12), self.u16(off + 14)
            off += (40 + extra + id_len + name_len + 7) & ~7
        return off

    def extensions(self):
        """[(offset of the extension header, type, length)] up to the end marker."""
        off = self.header_length
        out = []
        while off + 8 <= self.cs:
            t, n = struct.unpack_from(">II", self.b, off)
            if t == 0:
                break
            out.append((off, t, n))
            off += 8 + ((n + 7) & ~7)
        return out

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.b)


class Corpus:
    def __init__(self, work):
        self.work = work
        self.entries = []

    def base(self, name, opts="cluster_size=512", size="1M", io=(), snapshots=(), bitmaps=(),
             backing=None):
        """A fresh image made by qemu-img/qemu-io in the work directory."""
        p = os.path.join(self.work, name + ".qcow2")
        if os.path.exists(p):
            os.remove(p)
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
        if backing:
            # -u: the backing file need not exist (loops name files made later).
            args += ["-u", "-b", backing[0], "-F", backing[1]]
        must(args + [p] + ([size] if size else []))
        if io:
            cmd = ["qemu-io", "-f", "qcow2"]
            for c in io:
                cmd += ["-c", c]
            must(cmd + [p])
        for s in snapshots:
            must(["qemu-img", "snapshot", "-c", s, p])
        for bm in bitmaps:
            must(["qemu-img", "bitmap", "--add", p, bm])
        img = Img(p)
        if img.nb_snapshots:
            # Fixed dates, so that the corpus is the same on every run.
            for i in range(img.nb_snapshots):
                e = img.snapshot_entry(i)
                img.put64(e + 16, 0x6543210000000000 + i)
        return img

    def data_base(self, name, **kw):
        """The usual base: data at guest 0 and 600k (two L2 tables), no snapshot."""
        kw.setdefault("io", ["write -P 0x11 0 4k", "write -P 0x22 600k 4k"])
        return self.base(name, **kw)

    def add(self, name, img, iotest, damage, info, check, repair, convert, write,
            extra=(), extend_to=None, verdict_differs=None):
        fname = name + ".qcow2"
        img.save(os.path.join(HERE, fname))
        for f in extra:
            shutil.copy(os.path.join(self.work, f), os.path.join(HERE, f))
        qemu = self.qemu_view(fname, extend_to)
        e = {
            "name": name,
            "file": fname,
            "iotest": iotest,
            "damage": damage,
            "expect": {"info": info, "check": check, "repair": repair, "convert": convert,
                       "write": write},
            "qemu": qemu,
        }
        if extra:
            e["extra"] = list(extra)
        if extend_to:
            e["extend_to"] = extend_to
        if verdict_differs:
            e["verdict_differs"] = verdict_differs
        self.entries.append(e)

    def qemu_view(self, fname, extend_to):
        d = tempfile.mkdtemp(dir=self.work)
        for f in os.listdir(HERE):
            if not f.endswith((".py", ".json")):
                shutil.copy(os.path.join(HERE, f), d)
        p = os.path.join(d, fname)
        if extend_to:
            os.truncate(p, extend_to)
        ic, _, ie = run(["qemu-img", "info", p], cwd=d)
        cc, co, ce = run(["qemu-img", "check", p], cwd=d)
        first = (ce.strip() or co.strip()).splitlines()[:1]
        shutil.rmtree(d)
        return {"info_exit": ic, "check_exit": cc,
                "check_first_line": first[0].replace(d + "/", "") if first else ""}


def build(c):
    # ---------------------------------------------------------------- iotest 060: overlaps
    img = c.data_base("l2-into-l1")
    img.put64(img.l1_entry(0), img.l1 | (1 << 63))
    c.add("l2-into-l1", img, "060", "L1 entry 0 points at the L1 table itself (L2 reference into L1)",
          info="ok", check=2, repair=1, convert="ok", write="error:metadata overlaps")

    img = c.data_base("data-into-refblock")
    img.put64(img.l2_entry(0), img.refblock(0) | (1 << 63))
    c.add("data-into-refblock", img, "060", "a data cluster's L2 entry points at refcount block 0",
          info="ok", check=2, repair=0, convert="ok", write="error:overwrite metadata")

    img = c.data_base("data-into-inactive-l2", snapshots=["s0"],
                      io=["write -P 0x11 0 4k"])
    # After the snapshot, guest 0's L2 table is shared with s0; point a second data entry of
    # the active L1's table at it... the active table is that same table, so make the active
    # state private first.
    must(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 512", img.path])
    img = Img(img.path)
    img.put64(img.snapshot_entry(0) + 16, 0x6543210000000000)
    snap_l1 = img.u64(img.snapshot_entry(0))
    inactive_l2 = img.u64(snap_l1) & L1_MASK
    img.put64(img.l2_entry(4096), inactive_l2 | (1 << 63))
    c.add("data-into-inactive-l2", img, "060",
          "an active L2 entry points at an L2 table only a snapshot uses",
          info="ok", check=2, repair=0, convert="ok", write="error:overwrite metadata")

    img = c.data_base("header-refcount-zero")
    img.set_refcount(0, 0)
    c.add("header-refcount-zero", img, "060",
          "the header cluster's refcount is 0 (unallocated image header: the next allocation would take cluster 0)",
          info="ok", check=2, repair=0, convert="ok", write="error:refcounts are damaged")

    img = c.data_base("unaligned-l1-entry")
    img.put64(img.l1_entry(0), img.u64(img.l1_entry(0)) | 0x100)
    c.add("unaligned-l1-entry", img, "060",
          "L1 entry 0 has reserved low bits set (an unaligned L2 table offset)",
          info="ok", check=2, repair=2, convert="error", write="error")

    img = c.data_base("unaligned-l2-entry")
    img.put64(img.l2_entry(0), img.u64(img.l2_entry(0)) | 0x100)
    c.add("unaligned-l2-entry", img, "060",
          "the L2 entry of guest 0 has reserved bits set (an unaligned data cluster offset)",
          info="ok", check=2, repair=2, convert="error", write="error")

    img = c.base("unaligned-zero-cluster", io=["write -P 0x11 0 4k", "write -z 0 512"])
    e = img.l2_entry(0)
    img.put64(e, (img.u64(img.l2_entry(512)) & L1_MASK) | 1 | 0x100)
    c.add("unaligned-zero-cluster", img, "060",
          "a preallocated zero cluster's L2 entry has reserved bits set",
          info="ok", check=2, repair=2, convert="error", write="error")

    img = c.data_base("unaligned-reftable-entry")
    img.put64(img.rt, img.u64(img.rt) | 0x100)
    c.add("unaligned-reftable-entry", img, "060",
          "refcount table entry 0 has reserved bits set (an unaligned refcount block offset)",
          info="ok", check=2, repair=0, convert="ok", write="error:reserved bits")

    img = c.data_base("l1-overlaps-reftable")
    img.put64(40, img.rt)
    c.add("l1-overlaps-reftable", img, "060",
          "the active L1 table lies on the refcount table",
          info="ok", check=2, repair=2, convert="error", write="error:metadata overlaps")

    img = c.data_base("refblock-overlaps-l1")
    img.put64(img.rt, img.l1)
    c.add("refblock-overlaps-l1", img, "060",
          "refcount table entry 0 points at the active L1 table",
          info="ok", check=2, repair=0, convert="ok", write="error:metadata overlaps")

    img = c.data_base("reftable-points-at-itself")
    img.put64(img.rt, img.rt)
    c.add("reftable-points-at-itself", img, "060",
          "refcount table entry 0 points at the refcount table itself",
          info="ok", check=2, repair=0, convert="ok", write="error:metadata overlaps")

    img = c.base("snapshot-table-overlaps-l1", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put64(64, img.l1)
    c.add("snapshot-table-overlaps-l1", img, "060",
          "the snapshot table offset is the active L1 table's",
          info="ok", check=2, repair=1, convert="ok", write="error:metadata overlaps")

    img = c.base("snapshot-l1-is-active-l1", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put64(img.snapshot_entry(0), img.l1)
    c.add("snapshot-l1-is-active-l1", img, "060",
          "a snapshot's L1 table offset is the active L1 table's (two L1 tables on one cluster)",
          info="ok", check=2, repair=1, convert="ok", write="error:metadata overlaps")

    img = c.data_base("zero-refcount-used")
    img.set_refcount(img.l2_table(0) // img.cs, 0)
    c.add("zero-refcount-used", img, "060/108",
          "an L2 table in use has refcount 0",
          info="ok", check=2, repair=0, convert="ok", write="error:refcounts are damaged")

    img = c.data_base("l2-shared-by-all-l1-entries", size="32M",
                      io=["write -P 0x11 0 32k"])
    l2 = img.u64(img.l1_entry(0))
    for i in range(img.l1_size):
        img.put64(img.l1_entry(i), l2)
    c.add("l2-shared-by-all-l1-entries", img, "060",
          "every L1 entry points at the same L2 table (one table referenced 1024 times)",
          info="ok", check=2, repair=0, convert="ok", write="error:refcounts are damaged")

    # ---------------------------------------------------------------- iotest 080: bounds
    img = c.data_base("huge-header-length")
    img.put32(100, 0x10000000)
    c.add("huge-header-length", img, "080", "header_length far larger than the cluster",
          info="error:header_length", check=1, repair=1, convert="error", write="error")

    img = c.data_base("huge-extension")
    # 512-byte clusters leave no room for qemu's feature name table: add an unknown extension.
    at = img.extensions()[-1][0] + 8 if img.extensions() else img.header_length
    img.put32(at, 0x12345678)
    img.put32(at + 4, 0x7FFFFFF0)
    c.add("huge-extension", img, "080", "a header extension claims 2 GiB of data",
          info="error:header extension", check=1, repair=1, convert="error", write="error")

    img = c.data_base("huge-reftable-size")
    img.put32(56, 0x10000000)
    c.add("huge-reftable-size", img, "080", "refcount_table_clusters 2^28 (beyond qemu's 8 MiB)",
          info="error:refcount table", check=1, repair=1, convert="error", write="error")

    img = c.data_base("misaligned-reftable")
    img.put64(48, img.rt + 0x100)
    c.add("misaligned-reftable", img, "080", "refcount table offset not cluster-aligned",
          info="error:refcount table", check=1, repair=1, convert="error", write="error")

    img = c.data_base("huge-reftable-offset")
    img.put64(48, 0xFFFFFFFFFFFFFE00)
    c.add("huge-reftable-offset", img, "080", "refcount table offset 2^64-512 (offset + size overflows)",
          info="error:refcount table", check=1, repair=1, convert="error", write="error")

    img = c.base("too-many-snapshots", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put32(60, 0x10001)
    c.add("too-many-snapshots", img, "080/261", "nb_snapshots 65537, above qemu's limit",
          info="error:snapshots", check=1, repair=1, convert="error", write="error")

    img = c.base("snapshot-table-unaligned", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put64(64, img.snapshots + 0x100)
    c.add("snapshot-table-unaligned", img, "080", "snapshot table offset not cluster-aligned",
          info="error:snapshot table", check=1, repair=1, convert="error", write="error")

    img = c.base("snapshot-table-past-end", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put64(64, 0x7FFFFFFFFFFFFE00)
    c.add("snapshot-table-past-end", img, "080", "snapshot table offset far past the end of the file",
          info="error:snapshot table", check=1, repair=1, convert="error", write="error")

    img = c.data_base("huge-l1-size")
    img.put32(36, 0x10000000)
    c.add("huge-l1-size", img, "080", "l1_size 2^28 entries (2 GiB, beyond qemu's 32 MiB)",
          info="error:L1 table", check=1, repair=1, convert="error", write="error")

    img = c.data_base("l1-past-end")
    img.put64(40, 0x7FFFFFFFFFFFFE00)
    c.add("l1-past-end", img, "080", "L1 table offset far past the end of the file",
          info="error:L1 table", check=1, repair=1, convert="error", write="error")

    img = c.data_base("l1-unaligned")
    img.put64(40, img.l1 + 0x100)
    c.add("l1-unaligned", img, "080", "L1 table offset not cluster-aligned",
          info="error:L1 table", check=1, repair=1, convert="error", write="error")

    img = c.base("l1-too-small-with-snapshot", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put32(36, 0)
    c.add("l1-too-small-with-snapshot", img, "080",
          "l1_size 0 for a 1 MiB disk, in an image with a snapshot",
          info="error:L1 table", check=1, repair=1, convert="error", write="error")

    img = c.base("backing-name-too-long", opts="cluster_size=4096", size="1M",
                 backing=("base.raw", "raw"))
    img.put32(16, 1024)
    c.add("backing-name-too-long", img, "080", "backing_file_size 1024 (above 1023)",
          info="error:backing file name", check=1, repair=1, convert="error", write="error")

    img = c.data_base("l2-entry-huge-offset")
    img.put64(img.l2_entry(0), 0x00FFFFFFFFFFFE00 | (1 << 63))
    c.add("l2-entry-huge-offset", img, "080", "an L2 entry points 2^56 bytes into the file",
          info="ok", check=2, repair=2, convert="error:beyond the end", write="error:beyond the end")

    img = c.base("snapshot-l1-unaligned", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put64(img.snapshot_entry(0), img.u64(img.snapshot_entry(0)) + 0x100)
    c.add("snapshot-l1-unaligned", img, "080", "a snapshot's L1 table offset is not cluster-aligned",
          info="ok", check=2, repair=2, convert="ok", write="ok")

    img = c.base("snapshot-l1-past-end", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put64(img.snapshot_entry(0), 0x7FFFFFFFFFFFFE00)
    c.add("snapshot-l1-past-end", img, "080", "a snapshot's L1 table lies far past the end of the file",
          info="ok", check=2, repair=1, convert="ok", write="error:beyond the end",
          verdict_differs="qemu's check stops with an I/O error reading the L1 table past the "
                          "end (could not check); vimg's reports it as a corruption")

    img = c.base("snapshot-l1-too-large", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put32(img.snapshot_entry(0) + 8, 0x10000000)
    c.add("snapshot-l1-too-large", img, "080", "a snapshot's L1 table has 2^28 entries",
          info="ok", check=2, repair=2, convert="ok", write="ok")

    # ---------------------------------------------------------------- iotest 108: rebuilds
    img = c.data_base("no-refcount-table")
    for i in range(img.rt_clusters * img.cs // 8):
        img.put64(img.rt + 8 * i, 0)
    c.add("no-refcount-table", img, "108", "the refcount table is all zeros (no refcount blocks)",
          info="ok", check=2, repair=0, convert="ok", write="error:refcounts are damaged")

    img = c.data_base("refblock-past-end")
    img.put64(img.rt + 8, 0x10000000)
    c.add("refblock-past-end", img, "108", "refcount table entry 1 points past the end of the file",
          info="ok", check=2, repair=0, convert="ok", write="error:refcounts are damaged")

    # ---------------------------------------------------------------- iotest 138: 2^32 clusters
    img = c.data_base("cluster-index-2-32")
    img.put64(img.l2_entry(0), (1 << 41) | (1 << 63))
    c.add("cluster-index-2-32", img, "138",
          "a data cluster at host cluster 2^32 of a (sparse) 2 TiB file",
          info="ok", check=1, repair=1, convert="ok", write="ok", extend_to=(1 << 41) + 512)

    # ---------------------------------------------------------------- iotest 220: compressed
    img = c.base("compressed-past-end", io=["write -c -P 0x11 0 512"])
    e = img.l2_entry(0)
    img.put64(e, (img.u64(e) & ~((1 << 53) - 1)) | ((1 << 53) - 512))
    c.add("compressed-past-end", img, "220", "a compressed cluster descriptor points past the end of the file",
          info="ok", check=2, repair=2, convert="error:beyond the end", write="ok")

    # ---------------------------------------------------------------- iotest 261: snapshot table
    img = c.base("snapshot-extra-too-large", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put32(img.snapshot_entry(0) + 36, 0x10000)
    c.add("snapshot-extra-too-large", img, "261", "snapshot entry claims 64 KiB of extra data (limit 1024)",
          info="error:extra metadata", check=1, repair=1, convert="ok", write="error")

    img = c.base("snapshot-extra-incomplete", io=["write -P 0x11 0 4k"], snapshots=["s0"])
    img.put32(img.snapshot_entry(0) + 36, 8)
    c.add("snapshot-extra-incomplete", img, "261",
          "a v3 snapshot entry with 8 bytes of extra data (v3 needs 16)",
          info="ok", check=2, repair=0, convert="ok", write="ok")

    # ---------------------------------------------------------------- issue 6: the rest
    img = c.data_base("l1-reserved-bits")
    img.put64(img.l1_entry(0), img.u64(img.l1_entry(0)) | (1 << 60))
    c.add("l1-reserved-bits", img, "issue 6", "reserved bit 60 set in an L1 entry",
          info="ok", check=2, repair=2, convert="error", write="error")

    img = c.data_base("l2-reserved-bits")
    img.put64(img.l2_entry(0), img.u64(img.l2_entry(0)) | (1 << 58))
    c.add("l2-reserved-bits", img, "issue 6", "reserved bit 58 set in an L2 entry",
          info="ok", check=2, repair=2, convert="error", write="error")

    img = c.data_base("l2-table-past-end")
    img.put64(img.l1_entry(0), 0x40000000 | (1 << 63))
    c.add("l2-table-past-end", img, "issue 6", "L1 entry 0 points at an L2 table past the end of the file",
          info="ok", check=2, repair=2, convert="error:beyond the end", write="error")

    img = c.data_base("unknown-incompat")
    img.put64(72, img.u64(72) | (1 << 27))
    c.add("unknown-incompat", img, "issue 6", "incompatible feature bit 27, unnamed",
          info="error:Unsupported qcow2 feature", check=1, repair=1, convert="error", write="error")

    img = c.data_base("corrupt-bit")
    img.put64(72, img.u64(72) | 2)
    c.add("corrupt-bit", img, "issue 6", "the corrupt bit set on a clean image",
          info="ok", check=0, repair=0, convert="ok", write="error:corrupt")

    img = c.data_base("dirty-bit-bad-refcounts", opts="cluster_size=512,lazy_refcounts=on")
    img.put64(72, img.u64(72) | 1)
    img.set_refcount(img.l2_table(0) // img.cs, 0)
    c.add("dirty-bit-bad-refcounts", img, "issue 6",
          "dirty bit set (lazy refcounts) and an L2 table's refcount 0: a write open repairs it",
          info="ok", check=2, repair=0, convert="ok", write="ok")

    img = c.base("loop-a", opts="cluster_size=512", size="1M", backing=("loop-b.qcow2", "qcow2"))
    c.base("loop-b", opts="cluster_size=512", size="1M", backing=("loop-a.qcow2", "qcow2"))
    c.add("loop-a", img, "issue 6", "backing chain a -> b -> a",
          info="ok", check="error:infinite loop", repair=0, convert="error:infinite loop", write="error:infinite loop",
          extra=["loop-b.qcow2"])

    img = c.base("self-backing", opts="cluster_size=512", size="1M",
                 backing=("self-backing.qcow2", "qcow2"))
    c.add("self-backing", img, "issue 6", "the image is its own backing file",
          info="ok", check="error:infinite loop", repair=0, convert="error:infinite loop", write="error:infinite loop")

    img = c.data_base("bitmap-dir-past-end", opts="cluster_size=512", bitmaps=["b0"])
    for off, t, n in img.extensions():
        if t == 0x23852875:
            img.put64(off + 8 + 16, 0x7FFFFFFFFFFFFE00)
    c.add("bitmap-dir-past-end", img, "issue 6", "the bitmap directory lies far past the end of the file",
          info="error:bitmap directory", check=1, repair=1, convert="error", write="error")


def main():
    for t in ("qemu-img", "qemu-io"):
        if shutil.which(t) is None:
            sys.exit(f"make-corrupt.py: {t} is required")
    for f in os.listdir(HERE):
        if not f.endswith(".py"):
            os.remove(os.path.join(HERE, f))
    version = must(["qemu-img", "--version"]).splitlines()[0]
    with tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "base.raw"), "wb") as f:
            f.truncate(1 << 20)
        c = Corpus(work)
        build(c)
    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump({"qemu_version": version, "images": c.entries}, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"make-corrupt.py: {len(c.entries)} images in {HERE}")


if __name__ == "__main__":
    main()
