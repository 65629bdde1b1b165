//! ESXi's snapshot deltas (vmfsSparse "COWD" and seSparse extents) read by
//! `vimg::vmdk::cowd` and `vimg::vmdk::sesparse`, with qemu-img as the oracle. qemu cannot
//! create these, so the tests build them (tests/oracle/vmdk_esx_build.rs) over a flat base as
//! ESXi lays a snapshot out, check qemu-img accepts them (`info`), and compare, at the module
//! level (the descriptor-parsing driver is written elsewhere): the disk rebuilt from each
//! extent's `map` (data from the extent file, zeros, the parent's bytes where unallocated)
//! against `qemu-img convert -O raw` of the chain, and each run of `map` against
//! `qemu-img map --output json` (depth 0 data at the same offset, depth 0 zeros, depth >= 1
//! for unallocated); and the vmdk driver, opening the chain by its descriptors, against
//! qemu-img's `convert`, `map` and `compare`.

use crate::common;

#[path = "vmdk_esx_build.rs"]
mod build;

use build::Grain;
use common::{qemu_available, run, Rng};
use std::path::Path;
use std::sync::Arc;
use vimg::storage::{MemStorage, Storage};
use vimg::vmdk::mapping::{Mapped, Mapping};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next() as u8).collect()
}

/// Either extent kind, as the tests use it.
trait Extent {
    fn size(&self) -> u64;
    fn map(&self, offset: u64, max_len: u64) -> vimg::error::Result<Mapped>;
}

impl Extent for vimg::vmdk::cowd::CowdExtent {
    fn size(&self) -> u64 {
        self.size()
    }
    fn map(&self, offset: u64, max_len: u64) -> vimg::error::Result<Mapped> {
        self.map(offset, max_len)
    }
}

impl Extent for vimg::vmdk::sesparse::SeSparseExtent {
    fn size(&self) -> u64 {
        self.size()
    }
    fn map(&self, offset: u64, max_len: u64) -> vimg::error::Result<Mapped> {
        self.map(offset, max_len)
    }
}

/// The extent's runs over `[start, end)`, each asked for with the rest of the range.
fn runs(extent: &dyn Extent, start: u64, end: u64) -> Vec<(u64, Mapped)> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let m = extent.map(pos, end - pos).unwrap();
        assert!(m.len >= 1 && m.len <= end - pos, "run {m:?} at {pos}");
        out.push((pos, m));
        pos += m.len;
    }
    out
}

/// The disk the chain shows, rebuilt from the extent's map.
fn rebuild(extent: &dyn Extent, file: &[u8], base: &[u8]) -> Vec<u8> {
    let mut disk = Vec::with_capacity(base.len());
    for (pos, m) in runs(extent, 0, extent.size()) {
        let (a, n) = (pos as usize, m.len as usize);
        match m.mapping {
            Mapping::Unallocated => disk.extend_from_slice(&base[a..a + n]),
            Mapping::Zero => disk.resize(disk.len() + n, 0),
            Mapping::Data(h) => {
                let h = h.get() as usize;
                disk.extend_from_slice(&file[h..h + n]);
            }
            Mapping::Compressed(_) => panic!("a delta extent has no compressed grains"),
        }
    }
    disk
}

/// Checks the built chain against qemu-img: `info` accepts it with the right size and
/// parent, `convert -O raw` gives the disk rebuilt from the extent's map, and `map` agrees
/// with the extent's runs. Returns how many bytes were data, zero and unallocated.
fn check_against_qemu(
    chain: &build::Chain,
    extent: &dyn Extent,
    base: &[u8],
    dir: &Path,
) -> [u64; 3] {
    let file = std::fs::read(&chain.extent).unwrap();
    assert_eq!(extent.size(), base.len() as u64);
    let info: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["info", "--output", "json", p(&chain.delta)],
    ))
    .unwrap();
    assert_eq!(info["format"], "vmdk", "{info}");
    assert_eq!(info["virtual-size"], base.len() as u64, "{info}");
    assert_eq!(info["backing-filename"], "base.vmdk", "{info}");

    let out = dir.join("out.raw");
    run(
        "qemu-img",
        &["convert", "-O", "raw", p(&chain.delta), p(&out)],
    );
    let expected = std::fs::read(&out).unwrap();
    let got = rebuild(extent, &file, base);
    assert_eq!(got.len(), expected.len());
    if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
        panic!("the extent's view differs from qemu-img's at byte {i}");
    }

    // Unaligned requests of any length map to the same bytes.
    let mut rng = Rng::seeded(base.len() as u64);
    for _ in 0..2000 {
        let off = rng.below(base.len() as u64);
        let max = 1 + rng.below(3 * 4096);
        let m = extent.map(off, max).unwrap();
        assert!(m.len >= 1 && m.len <= max, "{m:?} for {max} bytes at {off}");
        let (a, n) = (off as usize, m.len as usize);
        let bytes = match m.mapping {
            Mapping::Unallocated => base[a..a + n].to_vec(),
            Mapping::Zero => vec![0; n],
            Mapping::Data(h) => file[h.get() as usize..h.get() as usize + n].to_vec(),
            Mapping::Compressed(_) => panic!("compressed grain in a delta"),
        };
        assert!(
            bytes == expected[a..a + n],
            "{m:?} for {max} bytes at {off}"
        );
    }

    let map: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output", "json", p(&chain.delta)],
    ))
    .unwrap();
    let mut kinds = [0u64; 3];
    let mut covered = 0;
    for e in map.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        assert_eq!(start, covered, "{e}");
        covered += length;
        let depth = e["depth"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        for (pos, m) in runs(extent, start, start + length) {
            match m.mapping {
                Mapping::Data(h) => {
                    kinds[0] += m.len;
                    assert!(depth == 0 && data, "{e}: {m:?} at {pos}");
                    let off = e["offset"].as_u64().unwrap();
                    assert_eq!(h.get(), off + (pos - start), "{e}: {m:?} at {pos}");
                }
                Mapping::Zero => {
                    kinds[1] += m.len;
                    assert!(depth == 0 && zero && !data, "{e}: {m:?} at {pos}");
                }
                Mapping::Unallocated => {
                    kinds[2] += m.len;
                    assert!(depth >= 1, "{e}: {m:?} at {pos}");
                }
                Mapping::Compressed(_) => panic!("compressed grain in a delta"),
            }
        }
    }
    assert_eq!(covered, base.len() as u64);
    driver_agrees(chain, &expected, &map, dir);
    kinds
}

/// The vmdk driver opens the chain through its descriptors as qemu-img does: `vimg convert -O
/// raw` gives qemu-img's bytes, `vimg map --output json` qemu-img's map, `vimg compare` finds
/// the chain equal to qemu's raw copy, and a writable open is refused (ESXi deltas are
/// read-only in vimg; qemu cannot write seSparse either).
fn driver_agrees(chain: &build::Chain, expected: &[u8], qemu_map: &serde_json::Value, dir: &Path) {
    let vimg = env!("CARGO_BIN_EXE_vimg");
    let out = dir.join("vimg.raw");
    run(vimg, &["convert", "-O", "raw", p(&chain.delta), p(&out)]);
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "vimg convert differs from qemu-img's"
    );
    let map: serde_json::Value =
        serde_json::from_str(&run(vimg, &["map", "--output", "json", p(&chain.delta)])).unwrap();
    assert_eq!(&map, qemu_map, "vimg map");
    let qemu_raw = dir.join("out.raw");
    run(
        vimg,
        &["compare", "-F", "raw", p(&chain.delta), p(&qemu_raw)],
    );
    let (code, msg) = common::run_status(
        vimg,
        &["convert", "-n", "-O", "vmdk", p(&qemu_raw), p(&chain.delta)],
    );
    assert_ne!(code, 0, "a write into an ESXi delta was accepted: {msg}");
    assert!(
        msg.contains("No write support for seSparse") || msg.contains("read-only"),
        "{msg}"
    );
}

fn open_mem<T>(path: &Path, open: fn(Arc<dyn Storage>, &Path) -> vimg::error::Result<T>) -> T {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(std::fs::read(path).unwrap()));
    open(storage, path).unwrap()
}

/// An seSparse delta of `size` bytes with random data, zero, unmapped and unallocated grains
/// (and one grain table left out), data stored out of order from grain index `first_index`.
fn sesparse_case(seed: u64, size: u64, first_index: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::seeded(seed);
    let base = random_bytes(&mut rng, size as usize);
    let n = size / 4096;
    let skipped_gt = if n > 2 * 4096 { Some(1) } else { None };
    let mut grains = Vec::new();
    for g in 0..n {
        if Some(g / 4096) == skipped_gt {
            continue;
        }
        let grain = match rng.below(8) {
            0..=2 => Grain::Data(random_bytes(&mut rng, 4096)),
            3 => Grain::Zero,
            4 => Grain::Unmapped,
            _ => continue,
        };
        grains.push((g, grain));
    }
    // Runs of consecutive data grains stored one after the other, and out of order.
    let mut order: Vec<usize> = (0..grains.len()).collect();
    for i in (1..order.len()).rev() {
        if rng.below(3) == 0 {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    let grains: Vec<_> = order.into_iter().map(|i| grains[i].clone()).collect();
    let (file, _) = build::sesparse(size / 512, &grains, first_index);
    let chain = build::write_chain(dir.path(), &base, "seSparse", "SESPARSE", &file);
    let extent = open_mem(&chain.extent, vimg::vmdk::sesparse::SeSparseExtent::open);
    let kinds = check_against_qemu(&chain, &extent, &base, dir.path());
    assert!(
        kinds.iter().all(|&k| k > 0),
        "every kind of grain: {kinds:?}"
    );
}

#[test]
fn sesparse_delta_reads_as_qemu_reads_it() {
    if !qemu_available("vmdk_esx sesparse") {
        return;
    }
    // Three grain tables, the middle one absent.
    sesparse_case(1, 40 << 20, 0);
    // Grain indexes across 4096: the index's low 12 bits sit apart from the rest.
    sesparse_case(2, 1 << 20, 4090);
}

fn cowd_case(seed: u64, size: u64, granularity: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::seeded(seed);
    let base = random_bytes(&mut rng, size as usize);
    let grain = u64::from(granularity) * 512;
    let n = size / grain;
    let per_gt = 4096;
    let mut grains = Vec::new();
    for g in 0..n {
        // Leave the second grain table out entirely.
        if g / per_gt == 1 || rng.below(3) == 0 {
            continue;
        }
        grains.push((g, random_bytes(&mut rng, grain as usize)));
    }
    let mut order: Vec<usize> = (0..grains.len()).collect();
    for i in (1..order.len()).rev() {
        if rng.below(3) == 0 {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    let grains: Vec<_> = order.into_iter().map(|i| grains[i].clone()).collect();
    let (file, _) = build::cowd((size / 512) as u32, granularity, &grains);
    let chain = build::write_chain(dir.path(), &base, "vmfsSparse", "VMFSSPARSE", &file);
    let extent = open_mem(&chain.extent, vimg::vmdk::cowd::CowdExtent::open);
    let kinds = check_against_qemu(&chain, &extent, &base, dir.path());
    assert!(
        kinds[0] > 0 && kinds[2] > 0,
        "data and unallocated: {kinds:?}"
    );
    assert_eq!(kinds[1], 0, "a COWD extent has no zero grains");
}

#[test]
fn vmfs_sparse_delta_reads_as_qemu_reads_it() {
    if !qemu_available("vmdk_esx vmfsSparse") {
        return;
    }
    // 512-byte grains (ESXi's), 2 MiB per grain table: four tables, the second absent.
    cowd_case(3, 8 << 20, 1);
    // 4 KiB grains.
    cowd_case(4, 48 << 20, 8);
}
