#!/usr/bin/env bash
# make-fixtures.sh: regenerate the committed test-image fixtures and their manifest.
#
# README
# ======
# Run from anywhere: `test-images/make-fixtures.sh`. Needs qemu-img and qemu-io (checked
# against 10.0.2), python3, gzip. It deletes everything in test-images/ except this script,
# builds every image from scratch in a temporary directory with qemu's own tools (black-box
# oracles only: no qemu code or test data is copied), and writes:
#
#   test-images/<name>            files of at most 16 KiB, committed as they are
#   test-images/<name>.gz         larger files (mostly empty), gzip -n -9
#   test-images/sub/...           an overlay whose backing name is relative ("../...")
#   test-images/manifest.json     one entry per image (see below)
#
# Auxiliary files (backing files, external data files) are committed next to the images that
# name them; names recorded inside images are relative, so the whole directory must be
# materialised into one place (tests/hostile/fixtures.rs decompresses everything into one TempDir).
#
# Holes: qemu's block status looks at holes in the host file (a raw hole is `zero`; a qcow2
# data cluster over a host hole is `zero` and `data`, but only when the image looks
# preallocated: when clearly more clusters have refcounts than the qcow2 file really allocates,
# so this depends on the qcow2 file's allocated size too). git does not keep holes, so every file
# is normalised before qemu is asked anything: each 4 KiB block that is all zeros becomes a
# hole (the python `sparsify` below). Consumers must materialise the files the same way
# (write only the non-zero 4 KiB blocks, then set the length) to see the layout qemu saw.
#
# Manifest entries (manifest.json is {"qemu_version": ..., "images": [...]}):
#   name, file (as committed, relative to test-images/), format ("raw"|"qcow2"),
#   kind ("good"|"bad"), features (short tags: what the image covers),
#   good: sha256 (of `qemu-img convert -O raw`, i.e. qemu's view of the whole guest disk),
#         virtual_size, map (parsed `qemu-img map --output=json`), info (parsed
#         `qemu-img info --output=json`), and for qcow2 check (parsed
#         `qemu-img check --output=json`) and check_exit (0 clean, 2 corruptions, 3 leaks).
#         Paths of the build directory are stripped from info/check (names are relative).
#   bad:  error_contains (lower-case substring vimg's error must contain when opening or
#         reading the image), qemu_info_exit, qemu_info_note (first stderr line of
#         `qemu-img info`), qemu_convert_exit (whether qemu itself could read all data: qemu
#         reads past the end of a file as zeros, so several "bad" images are readable there;
#         124: timed out, as qemu-img convert spins forever on a backing loop).
#
# Images (all small: 1-16 MiB virtual):
#   raw:            raw-holes, raw-odd-size (qemu rounds the size up to 512)
#   versions:       v2-64k (compat=0.10, with a snapshot), v3 c512/c4k/c64k/c2m cluster sizes
#   refcounts:      rc1, rc2, rc8, rc16, rc32, rc64 (refcount_bits)
#   zeros/prealloc: zero clusters in c* images; prealloc-metadata (zero-alloc clusters),
#                   prealloc-falloc, prealloc-full, host-holes-not-probed (holes under a data
#                   cluster that qemu does not report, see the comment there)
#   compression:    comp-zlib, comp-zstd (qemu-io write -c), comp-*-convert (qemu-img convert
#                   -c, mixed compressible/incompressible data), comp-zlib-4k, comp-zlib-2m,
#                   comp-zstd-512
#   extended L2:    el2-32k, el2-64k, el2-2m, el2-backing (over a raw file)
#   data file:      datafile (+ datafile.data), datafile-raw (data_file_raw=on)
#   chains:         chain-top -> chain-mid -> chain-base.raw, chain-bigger (8M over 4M),
#                   chain-smaller (2M over 4M), sub/chain-rel (backing ../chain-mid.qcow2),
#                   nofmt (backing format extension removed: the backing file is probed)
#   metadata:       snap (two internal snapshots, data changed after), bitmap (persistent
#                   bitmaps), lazy-dirty (lazy_refcounts, killed: dirty bit set), corrupt-bit
#   check:          check-leaks (2 leaked clusters), check-corrupt (refcount 0 for a used
#                   cluster)
#   bad:            bad-trunc-l2, bad-trunc-l1, bad-l1-size-huge, bad-l1-past-eof,
#                   bad-l1-unaligned, bad-reftable-past-eof, bad-header-length,
#                   bad-cluster-bits-30, bad-incompat-bit10, bad-incompat-named, bad-loop-a,
#                   bad-loop-b, bad-self-backing, bad-luks, bad-aes, bad-l2-entry-past-eof,
#                   bad-compressed-past-eof, bad-magic, bad-version4
#
# Deterministic except the LUKS image (random salt and keys) and actual-size in info (depends
# on the file system); snapshot dates are poked to a fixed value.
set -euo pipefail
export LC_ALL=C TZ=UTC

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
B=$(mktemp -d "${TMPDIR:-/tmp}/vimg-fixtures.XXXXXX")
S=$(mktemp -d "${TMPDIR:-/tmp}/vimg-fixtures-src.XXXXXX")
trap 'rm -rf "$B" "$S"' EXIT
cd "$B"

for t in qemu-img qemu-io python3 gzip; do
    command -v "$t" >/dev/null || { echo "make-fixtures.sh: $t is required" >&2; exit 1; }
done

# ---------------------------------------------------------------------------------------------
# python helper: header pokes, refcount edits, sparsifying, manifest writing
cat > "$S/fx.py" <<'PY'
import hashlib, json, os, random, struct, subprocess, sys, gzip, shutil

def rd(path):
    with open(path, 'rb') as f:
        return f.read()

def hdr(path):
    d = rd(path)[:112]
    h = {}
    (h['magic'], h['version'], h['backing_file_offset'], h['backing_file_size'],
     h['cluster_bits'], h['size'], h['crypt_method'], h['l1_size'], h['l1_table_offset'],
     h['refcount_table_offset'], h['refcount_table_clusters'], h['nb_snapshots'],
     h['snapshots_offset']) = struct.unpack('>IIQIIQIIQQIIQ', d[:72])
    if h['version'] >= 3:
        (h['incompat'], h['compat'], h['autoclear'], h['refcount_order'],
         h['header_length']) = struct.unpack('>QQQII', d[72:104])
    else:
        h['refcount_order'] = 4
        h['header_length'] = 72
    return h

def poke(path, off, fmt, val):
    with open(path, 'r+b') as f:
        f.seek(off)
        f.write(struct.pack('>' + fmt, val & ((1 << (8 * struct.calcsize(fmt))) - 1)))

def peek(path, off, fmt):
    with open(path, 'rb') as f:
        f.seek(off)
        return struct.unpack('>' + fmt, f.read(struct.calcsize('>' + fmt)))[0]

def refcount_pos(path, cluster):
    """(byte offset in file, bit shift, width) of the refcount of host cluster `cluster`."""
    h = hdr(path)
    cs = 1 << h['cluster_bits']
    bits = 1 << h['refcount_order']
    per_block = cs * 8 // bits
    rt_index, idx = divmod(cluster, per_block)
    rb = peek(path, h['refcount_table_offset'] + 8 * rt_index, 'Q') & ~0x1ff
    assert rb != 0, 'no refcount block for cluster %d' % cluster
    bitpos = idx * bits
    return rb + bitpos // 8, bitpos % 8, bits

def set_refcount(path, cluster, value):
    off, shift, bits = refcount_pos(path, cluster)
    if bits >= 8:
        poke(path, off, {8: 'B', 16: 'H', 32: 'I', 64: 'Q'}[bits], value)
    else:
        b = peek(path, off, 'B')
        mask = ((1 << bits) - 1) << shift
        poke(path, off, 'B', (b & ~mask) | ((value << shift) & mask))

def l2_entry_pos(path, guest):
    """File offset of the (standard, 8-byte) L2 entry for guest offset `guest`."""
    h = hdr(path)
    cb = h['cluster_bits']
    per_l2 = 1 << (cb - 3)
    c = guest >> cb
    l1e = peek(path, h['l1_table_offset'] + 8 * (c // per_l2), 'Q')
    l2 = l1e & 0x00fffffffffffe00
    assert l2 != 0, 'no L2 table for guest offset %d' % guest
    return l2 + 8 * (c % per_l2)

def extensions(path):
    h = hdr(path)
    d = rd(path)
    off = h['header_length']
    exts = []
    while True:
        t, n = struct.unpack('>II', d[off:off + 8])
        if t == 0:
            return h, off, exts, off + 8
        exts.append((t, d[off + 8:off + 8 + n]))
        off += 8 + ((n + 7) & ~7)

def write_extensions(path, exts, old_end):
    h = hdr(path)
    out = b''
    for t, data in exts:
        out += struct.pack('>II', t, len(data)) + data + b'\0' * (-len(data) % 8)
    out += b'\0' * 8
    end = h['header_length'] + len(out)
    limit = h['backing_file_offset'] or (1 << h['cluster_bits'])
    assert end <= limit, 'extensions do not fit'
    with open(path, 'r+b') as f:
        f.seek(h['header_length'])
        f.write(out + b'\0' * max(0, old_end - end))

def drop_ext(path, etype):
    h, _, exts, end = extensions(path)
    write_extensions(path, [e for e in exts if e[0] != etype], end)

def add_feature_name(path, ftype, bit, name):
    h, _, exts, end = extensions(path)
    entry = struct.pack('>BB', ftype, bit) + name.encode().ljust(46, b'\0')
    new = [(t, d + entry) if t == 0x6803f857 else (t, d) for t, d in exts]
    if not any(t == 0x6803f857 for t, _ in exts):
        new.append((0x6803f857, entry))  # qemu omits the table with small clusters
    write_extensions(path, new, end)

def fix_snapshot_dates(path):
    h = hdr(path)
    off = h['snapshots_offset']
    for i in range(h['nb_snapshots']):
        l1o, l1s, idl, nl, ds, dn, vmc, vms, extra = struct.unpack(
            '>QIHHIIQII', rd(path)[off:off + 40])
        poke(path, off + 16, 'I', 1700000000 + i)  # date_sec
        poke(path, off + 20, 'I', 0)               # date_nsec
        off += 40 + extra + idl + nl
        off = (off + 7) & ~7

def sparsify(path):
    """Rewrite `path` so that every all-zero 4 KiB block is a hole (see the README)."""
    d = rd(path)
    tmp = path + '.sparse-tmp'
    z = bytes(4096)
    with open(tmp, 'wb') as f:
        for o in range(0, len(d), 4096):
            blk = d[o:o + 4096]
            if blk != z[:len(blk)]:
                f.seek(o)
                f.write(blk)
        f.truncate(len(d))
    os.replace(tmp, path)

def mixed_source(path, size):
    """Deterministic test data in 64 KiB pieces: text, zeros, byte ramps, half random, and
    one wholly random (incompressible) piece at 64 KiB."""
    r = random.Random(20240611)
    words = b'lorem ipsum dolor sit amet qcow2 cluster refcount snapshot backing '.split()
    def text(n):
        s = bytearray()
        while len(s) < n:
            s += r.choice(words) + b' '
        return bytes(s[:n])
    out = bytearray()
    i = 0
    while len(out) < size:
        c = 65536
        k = i % 8
        if i == 1:
            out += r.randbytes(c)
        elif k in (2, 6):
            out += bytes(c)
        elif k == 3:
            out += bytes((j * 7 + i) % 251 for j in range(c))
        elif k == 5:
            out += text(c // 2) + r.randbytes(c // 8) + bytes(c // 2 - c // 8)
        else:
            out += text(c)
        i += 1
    with open(path, 'wb') as f:
        f.write(out[:size])

def random_file(path, size, seed):
    with open(path, 'wb') as f:
        f.write(random.Random(seed).randbytes(size))

def run(args, timeout=60):
    # qemu-img convert spins forever on a backing loop (info notices it): time out, exit 124
    try:
        p = subprocess.run(args, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, '', 'timed out after %d s' % timeout
    return p.returncode, p.stdout.decode(errors='replace'), p.stderr.decode(errors='replace')

def strip_paths(obj, base):
    if isinstance(obj, dict):
        return {k: strip_paths(v, base) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strip_paths(v, base) for v in obj]
    if isinstance(obj, str):
        return obj.replace(base + '/', '')
    return obj

def manifest(listfile, build, out, scratch):
    build = os.path.realpath(build)
    # normalise holes in every file first: qemu is asked about exactly what gets committed
    files = []
    for root, _, names in os.walk(build):
        for n in sorted(names):
            files.append(os.path.relpath(os.path.join(root, n), build))
    files.sort()
    for f in files:
        sparsify(os.path.join(build, f))
    ver = run(['qemu-img', '--version'])[1].splitlines()[0]
    committed = {}
    for f in files:
        src = os.path.join(build, f)
        os.makedirs(os.path.dirname(os.path.join(out, f)) or out, exist_ok=True)
        if os.path.getsize(src) > 16 * 1024:
            dst = f + '.gz'
            with open(src, 'rb') as i, open(os.path.join(out, dst), 'wb') as o:
                # gzip -n: no name, no timestamp, reproducible
                subprocess.run(['gzip', '-n', '-9', '-c'], stdin=i, stdout=o, check=True)
        else:
            dst = f
            shutil.copyfile(src, os.path.join(out, dst))
        committed[f] = dst
    images = []
    for line in open(listfile):
        kind, name, fmt, contains, feats = line.rstrip('\n').split('\t')
        path = os.path.join(build, name)
        e = {'name': name, 'file': committed[name], 'format': fmt, 'kind': kind,
             'features': feats.split()}
        if kind == 'good':
            rc, o, err = run(['qemu-img', 'info', '--output=json', '-f', fmt, path])
            assert rc == 0, (name, err)
            info = strip_paths(json.loads(o), build)
            rc, o, err = run(['qemu-img', 'map', '--output=json', '-f', fmt, path])
            assert rc == 0, (name, err)
            m = json.loads(o)
            raw = os.path.join(scratch, 'convert.raw')
            rc, o, err = run(['qemu-img', 'convert', '-f', fmt, '-O', 'raw', path, raw])
            assert rc == 0, (name, err)
            hsh = hashlib.sha256()
            with open(raw, 'rb') as f:
                for chunk in iter(lambda: f.read(1 << 20), b''):
                    hsh.update(chunk)
            vsize = os.path.getsize(raw)
            os.unlink(raw)
            assert vsize == info['virtual-size'], name
            e.update(sha256=hsh.hexdigest(), virtual_size=vsize, map=m, info=info)
            if fmt == 'qcow2':
                rc, o, err = run(['qemu-img', 'check', '--output=json', '-f', fmt, path])
                e['check'] = strip_paths(json.loads(o), build)
                e['check_exit'] = rc
        else:
            e['error_contains'] = contains
            rc, o, err = run(['qemu-img', 'info', '-f', fmt, path])
            e['qemu_info_exit'] = rc
            e['qemu_info_note'] = (err.strip().splitlines() or [''])[0].replace(build + '/', '')
            raw = os.path.join(scratch, 'convert.raw')
            rc, o, err = run(['qemu-img', 'convert', '-f', fmt, '-O', 'raw', path, raw], 10)
            e['qemu_convert_exit'] = rc
            if os.path.exists(raw):
                os.unlink(raw)
        images.append(e)
    names = [e['name'] for e in images]
    assert len(names) == len(set(names)), 'duplicate manifest names'
    with open(os.path.join(out, 'manifest.json'), 'w') as f:
        json.dump({'qemu_version': ver, 'images': images}, f, indent=1, sort_keys=True)
        f.write('\n')

if __name__ == '__main__':
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == 'poke':
        poke(args[0], int(args[1], 0), args[2], int(args[3], 0))
    elif cmd == 'or8':
        poke(args[0], int(args[1], 0), 'B', peek(args[0], int(args[1], 0), 'B') | int(args[2], 0))
    elif cmd == 'set-refcount':
        set_refcount(args[0], int(args[1], 0), int(args[2], 0))
    elif cmd == 'hdr':
        print(hdr(args[0])[args[1]])
    elif cmd == 'l2-entry-pos':
        print(l2_entry_pos(args[0], int(args[1], 0)))
    elif cmd == 'peek':
        print(peek(args[0], int(args[1], 0), args[2]))
    elif cmd == 'drop-ext':
        drop_ext(args[0], int(args[1], 0))
    elif cmd == 'add-feature-name':
        add_feature_name(args[0], int(args[1]), int(args[2]), args[3])
    elif cmd == 'fix-snapshot-dates':
        fix_snapshot_dates(args[0])
    elif cmd == 'mixed':
        mixed_source(args[0], int(args[1], 0))
    elif cmd == 'random':
        random_file(args[0], int(args[1], 0), int(args[2]))
    elif cmd == 'truncate':
        os.truncate(args[0], int(args[1], 0))
    elif cmd == 'manifest':
        manifest(*args)
    else:
        sys.exit('unknown command ' + cmd)
PY
fx() { python3 "$S/fx.py" "$@"; }

LIST="$S/list.tsv"
: > "$LIST"
# good NAME FORMAT "TAGS..."
good() { printf 'good\t%s\t%s\t-\t%s\n' "$1" "$2" "$3" >> "$LIST"; }
# bad NAME FORMAT ERROR_CONTAINS "TAGS..."
bad() { printf 'bad\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$LIST"; }

# qio [qemu-io options...] IMAGE: run qemu-io commands, fail loudly if one of them failed
# (qemu-io's exit status does not always say so).
qio() {
    local out
    if ! out=$(qemu-io "$@" 2>&1); then
        echo "qemu-io $*: failed: $out" >&2; return 1
    fi
    if grep -qiE 'error|failed|not supported|cannot' <<<"$out"; then
        echo "qemu-io $*: $out" >&2; return 1
    fi
}
mk() { qemu-img create -q "$@"; }
mkraw() { # mkraw FILE SIZE: an all-hole raw file
    rm -f "$1"; : > "$1"; fx truncate "$1" "$2"
}
K=1024
M=$((1024 * 1024))

# deterministic incompressible data for write -s
fx random "$S/rand64k.bin" 65536 1
fx mixed "$S/mixed.raw" $((1 * M))

# ---------------------------------------------------------------------------------------------
# raw
mkraw raw-holes.raw $((4 * M))
qio -f raw -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1049088 3000' \
    -c 'write -P 0x33 4190208 4k' -c 'write -P 0x34 2M 1' raw-holes.raw
good raw-holes.raw raw "raw holes data unaligned-write"

mkraw raw-odd-size.raw 1000001
qio -f raw -c 'write -P 0x44 0 5000' -c 'write -P 0x45 999000 1001' raw-odd-size.raw
good raw-odd-size.raw raw "raw odd-size holes"

# ---------------------------------------------------------------------------------------------
# qcow2 versions and cluster sizes. std_writes IMG: the same guest pattern on every image
# (offsets below 2 MiB so that the 512-byte-cluster image can stay small).
std_writes() {
    qio -c 'write -P 0x01 0 4k' \
        -c 'write -P 0x02 6000 1500' \
        -c 'write -z 64k 64k' \
        -c 'write -P 0x03 200k 300k' \
        -c 'write -z -u 256k 64k' \
        -c 'write -z 320k 1k' \
        -c 'discard 448k 32k' \
        -c 'write -P 0x04 1049088 512' \
        -c 'write -P 0x05 1536k 4k' \
        -c 'write -P 0x06 1540k 4k' \
        "$1"
}

mk -f qcow2 -o compat=0.10 v2-64k.qcow2 4M
std_writes v2-64k.qcow2
qemu-img snapshot -c s1 v2-64k.qcow2
qio -c 'write -P 0x07 0 64k' -c 'write -P 0x08 3M 64k' v2-64k.qcow2
fx fix-snapshot-dates v2-64k.qcow2
good v2-64k.qcow2 qcow2 "qcow2 v2 compat-0.10 cluster-64k zero-writes-v2 snapshot partial-cluster"

mk -f qcow2 -o cluster_size=512 c512.qcow2 2M
std_writes c512.qcow2
good c512.qcow2 qcow2 "qcow2 v3 cluster-512 zero-clusters partial-cluster"

mk -f qcow2 -o cluster_size=4k c4k.qcow2 4M
std_writes c4k.qcow2
qio -c 'write -P 0x09 3M 8k' c4k.qcow2
good c4k.qcow2 qcow2 "qcow2 v3 cluster-4k zero-clusters partial-cluster"

mk -f qcow2 -o cluster_size=64k c64k.qcow2 4M
std_writes c64k.qcow2
qio -c 'write -P 0x09 3M 8k' -c 'write -P 0x0a 4032k 64k' c64k.qcow2
good c64k.qcow2 qcow2 "qcow2 v3 cluster-64k zero-clusters partial-cluster"

mk -f qcow2 -o cluster_size=2M c2m.qcow2 16M
std_writes c2m.qcow2
qio -c 'write -z 4M 2M' -c 'write -P 0x09 6M 4k' -c 'write -P 0x0a 14M 1M' c2m.qcow2
good c2m.qcow2 qcow2 "qcow2 v3 cluster-2m zero-clusters partial-cluster"

# ---------------------------------------------------------------------------------------------
# refcount widths
for rb in 1 2 8 16 32 64; do
    mk -f qcow2 -o cluster_size=4k,refcount_bits=$rb rc$rb.qcow2 1M
    qio -c 'write -P 0x21 0 16k' -c 'discard 4k 4k' -c 'write -P 0x22 64k 8k' \
        -c 'write -P 0x23 4k 4k' -c 'write -z 128k 8k' rc$rb.qcow2
    if [ "$rb" -ge 2 ]; then
        # compressed clusters share host clusters: needs refcounts above 1
        qio -c 'write -c -P 0x24 256k 4k' -c 'write -c -P 0x25 260k 4k' rc$rb.qcow2
    fi
    good rc$rb.qcow2 qcow2 "qcow2 v3 cluster-4k refcount-bits-$rb"
done

# ---------------------------------------------------------------------------------------------
# preallocation and preallocated zero clusters
mk -f qcow2 -o preallocation=metadata prealloc-metadata.qcow2 4M
qio -c 'write -P 0x31 0 64k' -c 'write -P 0x32 100k 8k' -c 'write -z 128k 128k' \
    -c 'write -z -u 512k 64k' -c 'discard 1M 64k' -c 'write -z 2M 4k' prealloc-metadata.qcow2
good prealloc-metadata.qcow2 qcow2 "qcow2 v3 preallocation-metadata zero-alloc zero-clusters host-holes"

mk -f qcow2 -o preallocation=falloc prealloc-falloc.qcow2 2M
qio -c 'write -P 0x33 64k 64k' -c 'write -z 256k 64k' prealloc-falloc.qcow2
good prealloc-falloc.qcow2 qcow2 "qcow2 v3 preallocation-falloc zero-alloc host-holes"

mk -f qcow2 -o preallocation=full prealloc-full.qcow2 2M
qio -c 'write -P 0x34 64k 64k' -c 'write -z 256k 64k' prealloc-full.qcow2
good prealloc-full.qcow2 qcow2 "qcow2 v3 preallocation-full zero-alloc host-holes"

# qemu only looks for host-file holes under data clusters when the image "looks preallocated"
# (many more clusters have refcounts than the file really allocates). Here almost every
# refcounted cluster is really allocated, so the zero blocks of the cluster at 7 MiB are reported
# as plain data, unlike the same layout in a mostly-empty image (c64k).
mk -f qcow2 host-holes-not-probed.qcow2 8M
qio -c 'write -P 0x35 0 7M' -c 'write -P 0x36 7M 4k' -c 'write -P 0x37 7232k 4k' host-holes-not-probed.qcow2
good host-holes-not-probed.qcow2 qcow2 "qcow2 v3 cluster-64k host-holes host-holes-not-probed"

# ---------------------------------------------------------------------------------------------
# compression
comp_writes() { # comp_writes IMG CLUSTER
    local c=$2
    qio -c "write -c -P 0x41 0 $c" \
        -c "write -c -s $S/rand64k.bin $c $c" \
        -c "write -c -P 0x42 $((4 * c)) $c" \
        -c "write -c -P 0x43 $((5 * c)) $c" \
        -c "write -P 0x44 $((5 * c)) $((c / 2))" \
        -c "write -c -P 0x45 $((8 * c)) $c" \
        -c "write -z $((8 * c)) $c" \
        -c "write -P 0x46 $((10 * c)) $c" \
        "$1"
}
mk -f qcow2 comp-zlib.qcow2 2M
comp_writes comp-zlib.qcow2 65536
good comp-zlib.qcow2 qcow2 "qcow2 v3 cluster-64k compressed zlib incompressible-stored-plain cow-of-compressed"

mk -f qcow2 -o compression_type=zstd comp-zstd.qcow2 2M
comp_writes comp-zstd.qcow2 65536
good comp-zstd.qcow2 qcow2 "qcow2 v3 cluster-64k compressed zstd incompressible-stored-plain cow-of-compressed"

mk -f qcow2 -o cluster_size=4k comp-zlib-4k.qcow2 1M
comp_writes comp-zlib-4k.qcow2 4096
good comp-zlib-4k.qcow2 qcow2 "qcow2 v3 cluster-4k compressed zlib"

mk -f qcow2 -o cluster_size=512,compression_type=zstd comp-zstd-512.qcow2 1M
comp_writes comp-zstd-512.qcow2 512
good comp-zstd-512.qcow2 qcow2 "qcow2 v3 cluster-512 compressed zstd"

qemu-img convert -c -f raw -O qcow2 "$S/mixed.raw" comp-zlib-convert.qcow2
good comp-zlib-convert.qcow2 qcow2 "qcow2 v3 cluster-64k compressed zlib convert-c mixed-data"

qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$S/mixed.raw" comp-zstd-convert.qcow2
good comp-zstd-convert.qcow2 qcow2 "qcow2 v3 cluster-64k compressed zstd convert-c mixed-data"

mkraw "$S/mixed4m.raw" $((4 * M))
qemu-img convert -n -f raw -O raw "$S/mixed.raw" "$S/mixed4m.raw"
qio -f raw -c 'write -P 0x47 3M 1M' "$S/mixed4m.raw"
qemu-img convert -c -f raw -O qcow2 -o cluster_size=2M "$S/mixed4m.raw" comp-zlib-2m.qcow2
good comp-zlib-2m.qcow2 qcow2 "qcow2 v3 cluster-2m compressed zlib convert-c mixed-data"

# ---------------------------------------------------------------------------------------------
# extended L2 entries: subclusters that are data, zero and unallocated in one cluster
el2_writes() { # el2_writes IMG CLUSTER
    local c=$2 s=$(($2 / 32))
    qio -c "write -P 0x51 0 $s" \
        -c "write -P 0x52 $((3 * s)) $((2 * s + 100))" \
        -c "write -z $((10 * s)) $((4 * s))" \
        -c "write -z -u $((20 * s)) $((2 * s))" \
        -c "write -P 0x53 $((c + 5 * s)) $s" \
        -c "write -z -u $((c + 7 * s)) $s" \
        -c "write -z $((2 * c)) $c" \
        -c "write -c -P 0x54 $((3 * c)) $c" \
        -c "write -P 0x55 $((4 * c + 31 * s)) $((s + 1))" \
        -c "write -z $((6 * c + 2 * s)) $((3 * s))" \
        "$1"
}
mk -f qcow2 -o extended_l2=on,cluster_size=32k el2-32k.qcow2 2M
el2_writes el2-32k.qcow2 32768
good el2-32k.qcow2 qcow2 "qcow2 v3 extended-l2 cluster-32k subclusters zero-subclusters compressed"

mk -f qcow2 -o extended_l2=on,cluster_size=64k el2-64k.qcow2 4M
el2_writes el2-64k.qcow2 65536
good el2-64k.qcow2 qcow2 "qcow2 v3 extended-l2 cluster-64k subclusters zero-subclusters compressed"

mk -f qcow2 -o extended_l2=on,cluster_size=2M el2-2m.qcow2 16M
el2_writes el2-2m.qcow2 $((2 * M))
good el2-2m.qcow2 qcow2 "qcow2 v3 extended-l2 cluster-2m subclusters zero-subclusters compressed"

mkraw el2-base.raw $((4 * M))
qio -f raw -c 'write -P 0xe1 0 1M' -c 'write -P 0xe2 1M 1M' -c 'write -P 0xe3 3M 512k' el2-base.raw
mk -f qcow2 -o extended_l2=on,cluster_size=64k -b el2-base.raw -F raw el2-backing.qcow2 4M
el2_writes el2-backing.qcow2 65536
qio -c 'write -P 0x56 3080k 2k' el2-backing.qcow2
good el2-backing.qcow2 qcow2 "qcow2 v3 extended-l2 cluster-64k subclusters backing raw-backing"

# ---------------------------------------------------------------------------------------------
# external data files
mk -f qcow2 -o data_file=datafile.data datafile.qcow2 4M
qio -c 'write -P 0x61 0 64k' -c 'write -P 0x62 300k 10k' -c 'write -z 1M 128k' \
    -c 'write -P 0x63 2M 64k' -c 'discard 2M 64k' -c 'write -P 0x64 3M 4k' datafile.qcow2
good datafile.qcow2 qcow2 "qcow2 v3 data-file"

mk -f qcow2 -o data_file=datafile-raw.data,data_file_raw=on datafile-raw.qcow2 4M
qio -c 'write -P 0x65 0 64k' -c 'write -P 0x66 300k 10k' -c 'write -z 1M 128k' \
    -c 'write -P 0x67 3M 4k' datafile-raw.qcow2
good datafile-raw.qcow2 qcow2 "qcow2 v3 data-file data-file-raw"

# ---------------------------------------------------------------------------------------------
# backing chains (all names recorded relative to the image's directory)
mkraw chain-base.raw $((4 * M))
qio -f raw -c 'write -P 0x81 0 1M' -c 'write -P 0x82 3M 512k' chain-base.raw
good chain-base.raw raw "raw chain-base"

mk -f qcow2 -b chain-base.raw -F raw chain-mid.qcow2
qio -c 'write -P 0x83 512k 1M' -c 'write -z 3200k 64k' -c 'write -P 0x89 3968k 64k' chain-mid.qcow2
good chain-mid.qcow2 qcow2 "qcow2 v3 backing raw-backing chain-2"

mk -f qcow2 -o cluster_size=4k -b chain-mid.qcow2 -F qcow2 chain-top.qcow2
qio -c 'write -P 0x84 768k 64k' -c 'write -z 0 64k' -c 'write -z -u 2M 64k' \
    -c 'write -P 0x85 3300k 5k' chain-top.qcow2
good chain-top.qcow2 qcow2 "qcow2 v3 backing chain-3 qcow2-over-qcow2-over-raw cluster-4k-over-64k"

mk -f qcow2 -b chain-mid.qcow2 -F qcow2 chain-bigger.qcow2 8M
qio -c 'write -P 0x86 5M 64k' -c 'write -P 0x87 4032k 128k' chain-bigger.qcow2
good chain-bigger.qcow2 qcow2 "qcow2 v3 backing overlay-larger-than-backing"

mk -f qcow2 -b chain-mid.qcow2 -F qcow2 chain-smaller.qcow2 2M
qio -c 'write -P 0x88 1M 4k' chain-smaller.qcow2
good chain-smaller.qcow2 qcow2 "qcow2 v3 backing overlay-smaller-than-backing"

mkdir -p sub
mk -f qcow2 -b ../chain-mid.qcow2 -F qcow2 sub/chain-rel.qcow2
qio -c 'write -P 0x8a 64k 4k' sub/chain-rel.qcow2
good sub/chain-rel.qcow2 qcow2 "qcow2 v3 backing relative-backing-name subdirectory"

mk -f qcow2 -b chain-base.raw -F raw nofmt.qcow2
qio -c 'write -P 0x8b 2M 64k' nofmt.qcow2
fx drop-ext nofmt.qcow2 0xe2792aca   # qemu-img 10 refuses rebase -u without -F: poke instead
good nofmt.qcow2 qcow2 "qcow2 v3 backing backing-format-not-recorded probe-backing"

# ---------------------------------------------------------------------------------------------
# snapshots, bitmaps, dirty and corrupt flags
mk -f qcow2 snap.qcow2 4M
qio -c 'write -P 0x91 0 1M' -c 'write -P 0x92 2M 64k' snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
qio -c 'write -P 0x93 512k 128k' -c 'write -z 2M 64k' snap.qcow2
qemu-img snapshot -c s2 snap.qcow2
qio -c 'write -P 0x94 0 4k' -c 'discard 768k 64k' -c 'write -P 0x95 3M 64k' snap.qcow2
fx fix-snapshot-dates snap.qcow2
good snap.qcow2 qcow2 "qcow2 v3 snapshots internal-snapshots changed-after-snapshot"

mk -f qcow2 bitmap.qcow2 4M
qio -c 'write -P 0x96 0 128k' bitmap.qcow2
qemu-img bitmap --add bitmap.qcow2 b0
qemu-img bitmap --add -g 128k bitmap.qcow2 b1
qemu-img bitmap --disable bitmap.qcow2 b1
qio -c 'write -P 0x97 1M 64k' bitmap.qcow2
good bitmap.qcow2 qcow2 "qcow2 v3 bitmaps persistent-bitmap"

mk -f qcow2 -o cluster_size=4k,lazy_refcounts=on lazy-dirty.qcow2 1M
qio -c 'write -P 0x98 0 64k' -c 'flush' lazy-dirty.qcow2
set +e
(qemu-io -c 'write -P 0x99 128k 64k' -c 'flush' -c 'write -P 0x9a 512k 4k' -c 'sigraise 9' \
    lazy-dirty.qcow2 >/dev/null 2>&1; true) 2>/dev/null
set -e
[ "$(( $(fx peek lazy-dirty.qcow2 72 Q) & 1 ))" = 1 ] || { echo "lazy-dirty: not dirty" >&2; exit 1; }
good lazy-dirty.qcow2 qcow2 "qcow2 v3 lazy-refcounts dirty-bit"

mk -f qcow2 -o cluster_size=4k corrupt-bit.qcow2 1M
qio -c 'write -P 0x9b 0 8k' corrupt-bit.qcow2
fx or8 corrupt-bit.qcow2 79 2
good corrupt-bit.qcow2 qcow2 "qcow2 v3 corrupt-bit read-only"

# check: leaks (refcount above the number of references) and corruptions (refcount 0 for a
# cluster in use)
mk -f qcow2 -o cluster_size=4k check-leaks.qcow2 1M
qio -c 'write -P 0xa1 0 8k' -c 'write -P 0xa2 512k 4k' check-leaks.qcow2
n=$(stat -c %s check-leaks.qcow2)
fx truncate check-leaks.qcow2 $((n + 4096))          # one more cluster, referenced by nothing
fx set-refcount check-leaks.qcow2 $((n / 4096)) 1
fx set-refcount check-leaks.qcow2 0 2                # the header cluster, counted twice
good check-leaks.qcow2 qcow2 "qcow2 v3 check-leaks"

mk -f qcow2 -o cluster_size=4k check-corrupt.qcow2 1M
qio -c 'write -P 0xa3 0 8k' -c 'write -P 0xa4 512k 4k' check-corrupt.qcow2
data_cluster=$(( $(fx peek check-corrupt.qcow2 "$(fx l2-entry-pos check-corrupt.qcow2 0)" Q) & 0x00fffffffffffe00 ))
fx set-refcount check-corrupt.qcow2 $((data_cluster / 4096)) 0
good check-corrupt.qcow2 qcow2 "qcow2 v3 check-corruptions"

# ---------------------------------------------------------------------------------------------
# hostile and damaged images (vimg must refuse them with an error, never panic)
small() { # small IMG [create options]: 4k clusters, 1 MiB, a little data
    local img=$1; shift
    mk -f qcow2 -o cluster_size=4k "$@" "$img" 1M
    qio -c 'write -P 0xb1 0 8k' -c 'write -P 0xb2 600k 4k' "$img"
}

small bad-trunc-l2.qcow2
l2=$(( $(fx peek bad-trunc-l2.qcow2 "$(fx hdr bad-trunc-l2.qcow2 l1_table_offset)" Q) & 0x00fffffffffffe00 ))
fx truncate bad-trunc-l2.qcow2 $((l2 + 2048))
bad bad-trunc-l2.qcow2 qcow2 "l2" "qcow2 truncated l2-table"

mk -f qcow2 -o cluster_size=512 bad-trunc-l1.qcow2 4M
qio -c 'write -P 0xb3 0 8k' bad-trunc-l1.qcow2
fx truncate bad-trunc-l1.qcow2 $(( $(fx hdr bad-trunc-l1.qcow2 l1_table_offset) + 512 ))
bad bad-trunc-l1.qcow2 qcow2 "l1" "qcow2 truncated l1-table cluster-512"

small bad-l1-size-huge.qcow2
fx poke bad-l1-size-huge.qcow2 36 I 0x7fffffff
bad bad-l1-size-huge.qcow2 qcow2 "l1" "qcow2 l1-size-huge"

small bad-l1-past-eof.qcow2
fx poke bad-l1-past-eof.qcow2 40 Q 0x40000000
bad bad-l1-past-eof.qcow2 qcow2 "beyond the end" "qcow2 l1-offset-past-eof"

small bad-l1-unaligned.qcow2
fx poke bad-l1-unaligned.qcow2 40 Q $(( $(fx hdr bad-l1-unaligned.qcow2 l1_table_offset) + 8 ))
bad bad-l1-unaligned.qcow2 qcow2 "align" "qcow2 l1-offset-unaligned"

small bad-reftable-past-eof.qcow2
fx poke bad-reftable-past-eof.qcow2 48 Q 0x40000000
bad bad-reftable-past-eof.qcow2 qcow2 "refcount" "qcow2 refcount-table-past-eof"

small bad-header-length.qcow2
fx poke bad-header-length.qcow2 100 I 0xfffffff8
bad bad-header-length.qcow2 qcow2 "header" "qcow2 header-length-huge"

small bad-cluster-bits-30.qcow2
fx poke bad-cluster-bits-30.qcow2 20 I 30
bad bad-cluster-bits-30.qcow2 qcow2 "cluster size" "qcow2 cluster-bits-30"

small bad-incompat-bit10.qcow2
fx or8 bad-incompat-bit10.qcow2 78 4          # bit 10 of the big-endian u64 at byte 72
bad bad-incompat-bit10.qcow2 qcow2 "incompatible" "qcow2 unknown-incompatible-feature"

small bad-incompat-named.qcow2
fx add-feature-name bad-incompat-named.qcow2 0 13 "frobnicated widgets"
fx or8 bad-incompat-named.qcow2 78 0x20       # bit 13
bad bad-incompat-named.qcow2 qcow2 "frobnicated widgets" "qcow2 unknown-incompatible-feature feature-name-table"

small bad-loop-a.qcow2
mk -f qcow2 -o cluster_size=4k -b bad-loop-a.qcow2 -F qcow2 bad-loop-b.qcow2
qemu-img rebase -u -f qcow2 -b bad-loop-b.qcow2 -F qcow2 bad-loop-a.qcow2
bad bad-loop-a.qcow2 qcow2 "loop" "qcow2 backing backing-loop"
bad bad-loop-b.qcow2 qcow2 "loop" "qcow2 backing backing-loop"

small bad-self-backing.qcow2
qemu-img rebase -u -f qcow2 -b bad-self-backing.qcow2 -F qcow2 bad-self-backing.qcow2
bad bad-self-backing.qcow2 qcow2 "loop" "qcow2 backing backing-loop self-backing"

SECRET=(--object secret,id=s0,data=vimg-test-password)
mk "${SECRET[@]}" -f qcow2 -o cluster_size=4k,encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc bad-luks.qcow2 1M
qio "${SECRET[@]}" --image-opts -c 'write -P 0xc1 0 8k' \
    driver=qcow2,file.filename=bad-luks.qcow2,encrypt.key-secret=s0
bad bad-luks.qcow2 qcow2 "encrypt" "qcow2 encryption luks"

mk "${SECRET[@]}" -f qcow2 -o cluster_size=4k,encrypt.format=aes,encrypt.key-secret=s0 bad-aes.qcow2 1M
qio "${SECRET[@]}" --image-opts -c 'write -P 0xc2 0 8k' \
    driver=qcow2,file.filename=bad-aes.qcow2,encrypt.key-secret=s0
bad bad-aes.qcow2 qcow2 "encrypt" "qcow2 encryption legacy-aes"

small bad-l2-entry-past-eof.qcow2
pos=$(fx l2-entry-pos bad-l2-entry-past-eof.qcow2 0)
fx poke bad-l2-entry-past-eof.qcow2 "$pos" Q $(( (1 << 63) | 0x40000000 ))
bad bad-l2-entry-past-eof.qcow2 qcow2 "beyond the end" "qcow2 l2-entry-past-eof"

mk -f qcow2 -o cluster_size=4k bad-compressed-past-eof.qcow2 1M
qio -c 'write -c -P 0xb4 0 4k' -c 'write -P 0xb5 8k 4k' bad-compressed-past-eof.qcow2
pos=$(fx l2-entry-pos bad-compressed-past-eof.qcow2 0)
e=$(fx peek bad-compressed-past-eof.qcow2 "$pos" Q)
x=$((62 - (12 - 8)))                           # host offset bits of a 4k-cluster descriptor
fx poke bad-compressed-past-eof.qcow2 "$pos" Q $(( (e & ~((1 << x) - 1)) | 0x4000010 ))
bad bad-compressed-past-eof.qcow2 qcow2 "beyond the end" "qcow2 compressed compressed-past-eof"

small bad-magic.qcow2
fx poke bad-magic.qcow2 0 I 0x514649fc
bad bad-magic.qcow2 qcow2 "magic" "qcow2 bad-magic"

small bad-version4.qcow2
fx poke bad-version4.qcow2 4 I 4
bad bad-version4.qcow2 qcow2 "version" "qcow2 version-4"

# ---------------------------------------------------------------------------------------------
# write everything out
find "$HERE" -mindepth 1 -maxdepth 1 ! -name make-fixtures.sh -exec rm -rf {} +
fx manifest "$LIST" "$B" "$HERE" "$S"
echo "make-fixtures.sh: $(grep -c . "$LIST") images, $(du -sh --apparent-size "$HERE" | cut -f1) in $HERE"
