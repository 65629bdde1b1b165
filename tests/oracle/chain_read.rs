//! Reading through a backing chain (`vimg::chain_read`): random writes, zero writes and
//! compressed clusters in a chain of qcow2 over qcow2 over raw, each layer of its own virtual
//! size and cluster size, read back as a plain in-memory model of every layer says; qemu-img
//! compare, where qemu is installed, confirms the model against qemu's reading of the chain.

use crate::common;
use proptest::prelude::*;
use std::path::Path;
use vimg::open::{open_image, OpenOptions};
use vimg::qcow2::{create, CompressionType, CreateOptions};
use vimg::raw::RawImage;
use vimg::{BlockImage, GuestOffset};

/// One change to a layer; offsets and lengths are resolved against the layer's size.
#[derive(Debug, Clone)]
enum Op {
    /// Bytes of a pattern at any byte offset.
    Write(u64, u64, u8),
    /// Zeros, with or without unmapping.
    Zero(u64, u64, bool),
    /// A whole compressed cluster (qcow2 layers only; the others write it plainly).
    Compressed(u64, u8),
}

/// One qcow2 layer: size in sectors, cluster bits, extended L2, zstd, and its changes.
type QLayer = (u64, u32, bool, bool, Vec<Op>);

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u64>(), 1u64..200_000, any::<u8>()).prop_map(|(o, l, p)| Op::Write(o, l, p)),
        2 => (any::<u64>(), 1u64..200_000, any::<bool>()).prop_map(|(o, l, u)| Op::Zero(o, l, u)),
        2 => (any::<u64>(), any::<u8>()).prop_map(|(c, p)| Op::Compressed(c, p)),
    ]
}

fn qlayer() -> impl Strategy<Value = QLayer> {
    (
        1u64..800,
        prop_oneof![Just(9u32), Just(12u32), Just(16u32)],
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(op(), 0..8),
    )
}

/// Pattern bytes that compress well but differ from cluster to cluster.
fn pattern(len: usize, p: u8, at: u64) -> Vec<u8> {
    (0..len)
        .map(|i| if i % 97 == 0 { (at >> 9) as u8 ^ p } else { p })
        .collect()
}

/// Applies `ops` to `img` and to `model`, its guest view; `cs` is its cluster size, if
/// compressed clusters may be written. Compressed clusters go first, each on a cluster not
/// written yet, as the capability requires.
fn apply(img: &dyn BlockImage, model: &mut [u8], ops: &[Op], cs: Option<u64>) {
    let size = model.len() as u64;
    let mut compressed = std::collections::BTreeSet::new();
    for o in ops {
        if let (Op::Compressed(c, p), Some(cs)) = (o, cs) {
            let off = c % size.div_ceil(cs) * cs;
            if !compressed.insert(off) {
                continue;
            }
            let n = cs.min(size - off) as usize;
            let data = pattern(n, *p, off);
            let cw = img
                .as_compressed_writes()
                .expect("qcow2 writes compressed clusters");
            // A cluster that does not get smaller (a short last one) is written plainly.
            // Compressed whole, the part past the end of the disk as zeros (as convert does).
            let mut cluster = data.clone();
            cluster.resize(cs as usize, 0);
            match cw.compress(&cluster).unwrap() {
                Some(z) => cw.write_compressed(GuestOffset(off), &z).unwrap(),
                None => img.write_at(&data, GuestOffset(off)).unwrap(),
            }
            model[off as usize..off as usize + n].copy_from_slice(&data);
        }
    }
    if let Some(cw) = img.as_compressed_writes() {
        cw.finish_compressed().unwrap();
    }
    for o in ops {
        match *o {
            Op::Write(o, l, p) => {
                let off = o % size;
                let n = l.min(size - off) as usize;
                let data = pattern(n, p, off);
                img.write_at(&data, GuestOffset(off)).unwrap();
                model[off as usize..off as usize + n].copy_from_slice(&data);
            }
            Op::Zero(o, l, unmap) => {
                let off = o % size;
                let n = l.min(size - off);
                img.write_zeroes(GuestOffset(off), n, unmap).unwrap();
                model[off as usize..(off + n) as usize].fill(0);
            }
            Op::Compressed(c, p) if cs.is_none() => {
                let off = c % size;
                let n = (size - off).min(4096) as usize;
                let data = pattern(n, p, off);
                img.write_at(&data, GuestOffset(off)).unwrap();
                model[off as usize..off as usize + n].copy_from_slice(&data);
            }
            Op::Compressed(..) => {}
        }
    }
    img.finish().unwrap();
}

/// What `path` reads, whole and in `cuts` random pieces, against `model`.
fn check_reads(path: &Path, model: &[u8], cuts: &[(u64, u64)]) -> Result<(), TestCaseError> {
    let img = open_image(path, &OpenOptions::default()).unwrap();
    prop_assert_eq!(img.virtual_size(), model.len() as u64);
    let mut all = vec![0xeeu8; model.len()];
    img.read_at(&mut all, GuestOffset(0)).unwrap();
    if let Some(i) = (0..model.len()).find(|&i| all[i] != model[i]) {
        prop_assert!(
            false,
            "{}: byte {i:#x} reads {:#x}, model {:#x}",
            path.display(),
            all[i],
            model[i]
        );
    }
    let size = model.len() as u64;
    for &(o, l) in cuts {
        let off = o % size;
        let n = (l % (size - off) + 1) as usize;
        let mut buf = vec![0xeeu8; n];
        img.read_at(&mut buf, GuestOffset(off)).unwrap();
        prop_assert!(
            buf[..] == model[off as usize..off as usize + n],
            "{}: read of {n} bytes at {off:#x} differs from the model",
            path.display()
        );
    }
    Ok(())
}

/// Creates a qcow2 layer at `path` over `backing` (a name next to it, of format `fmt`).
fn create_layer(path: &Path, q: &QLayer, backing: &str, fmt: &str) -> u64 {
    let size = q.0 * 512;
    create(
        path,
        &CreateOptions {
            size,
            cluster_size: 1 << q.1,
            extended_l2: q.2 && q.1 >= 14,
            compression_type: if q.3 {
                CompressionType::Zstd
            } else {
                CompressionType::Zlib
            },
            backing_file: Some(backing.to_string()),
            backing_fmt: Some(fmt.to_string()),
            ..Default::default()
        },
    )
    .unwrap();
    size
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_chain_reads_as_its_model(
        base_sectors in 1u64..800,
        base_ops in proptest::collection::vec(op(), 0..6),
        mid in qlayer(),
        top in qlayer(),
        cuts in proptest::collection::vec((any::<u64>(), any::<u64>()), 1..6),
    ) {
        let d = tempfile::tempdir().unwrap();
        let (bp, mp, tp) = (d.path().join("base.raw"), d.path().join("mid.qcow2"), d.path().join("top.qcow2"));

        let mut base = vec![0u8; (base_sectors * 512) as usize];
        {
            let img = RawImage::create(&bp, base.len() as u64).unwrap();
            apply(&img, &mut base, &base_ops, None);
        }

        let msize = create_layer(&mp, &mid, "base.raw", "raw");
        let mut mview = base.clone();
        mview.resize(msize as usize, 0);
        {
            let img = open_image(&mp, &OpenOptions { writable: true, ..Default::default() }).unwrap();
            apply(img.as_ref(), &mut mview, &mid.4, Some(1 << mid.1));
        }

        let tsize = create_layer(&tp, &top, "mid.qcow2", "qcow2");
        let mut tview = mview.clone();
        tview.resize(tsize as usize, 0);
        {
            let img = open_image(&tp, &OpenOptions { writable: true, ..Default::default() }).unwrap();
            apply(img.as_ref(), &mut tview, &top.4, Some(1 << top.1));
        }

        check_reads(&mp, &mview, &cuts)?;
        check_reads(&tp, &tview, &cuts)?;

        if common::qemu_available("a_chain_reads_as_its_model") {
            let model = d.path().join("model.raw");
            std::fs::write(&model, &tview).unwrap();
            let (code, out) = common::run_status(
                "qemu-img",
                &["compare", "-f", "qcow2", "-F", "raw", tp.to_str().unwrap(), model.to_str().unwrap()],
            );
            prop_assert_eq!(code, 0, "qemu-img compare: {}", out);
        }
    }
}
