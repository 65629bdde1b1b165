//! Hostile ESXi snapshot deltas: each damaged field of a vmfsSparse (COWD) or seSparse extent
//! built from the spec (tests/oracle/vmdk_esx_build.rs) makes `open` or `map` of
//! `vimg::vmdk::cowd` / `vimg::vmdk::sesparse` return a one-line error naming the file, never
//! a panic, and the fuzz entries (`exercise`) run on each. Where qemu-img refuses the same
//! delta (opening it, or reading it), that is checked too, and where qemu words the refusal,
//! vimg's error carries the same words.

use crate::common;

#[path = "../oracle/vmdk_esx_build.rs"]
mod build;

use build::Grain;
use common::{qemu_available, run_status};
use std::path::Path;
use std::sync::Arc;
use vimg::storage::{MemStorage, Storage};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}

/// What qemu-img makes of a damaged delta.
#[derive(Clone, Copy, PartialEq)]
enum Qemu {
    /// qemu-img info fails, with the words vimg's error has.
    RefusesOpen,
    /// qemu-img info succeeds but convert fails (a read error).
    FailsRead,
    /// qemu-img info succeeds (qemu reads past the end of a file as zeros, or does not look).
    Accepts,
    /// Not checked (qemu misbehaves: a granularity of 0 makes it divide by zero on reads).
    Any,
}

type Damage = Box<dyn Fn(&mut Vec<u8>)>;

/// A damaged delta: its name, the damage, words vimg's error must have, and what qemu-img
/// does with it.
type Case = (&'static str, Damage, &'static str, Qemu);

/// Opens `bytes` with `open` and maps every grain; the first error, if any.
fn first_error<T>(
    bytes: &[u8],
    path: &Path,
    open: fn(Arc<dyn Storage>, &Path) -> vimg::error::Result<T>,
    size: fn(&T) -> u64,
    map: fn(&T, u64, u64) -> vimg::error::Result<vimg::vmdk::mapping::Mapped>,
) -> Option<vimg::error::Error> {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes.to_vec()));
    let extent = match open(storage, path) {
        Ok(e) => e,
        Err(e) => return Some(e),
    };
    let end = size(&extent);
    let mut pos = 0;
    while pos < end {
        match map(&extent, pos, end - pos) {
            Ok(m) => pos += m.len,
            Err(e) => return Some(e),
        }
    }
    None
}

#[allow(clippy::too_many_arguments)]
fn check_cases<T>(
    kind: &str,
    create_type: &str,
    extent_type: &str,
    good: &[u8],
    cases: Vec<Case>,
    open: fn(Arc<dyn Storage>, &Path) -> vimg::error::Result<T>,
    size: fn(&T) -> u64,
    map: fn(&T, u64, u64) -> vimg::error::Result<vimg::vmdk::mapping::Mapped>,
    exercise: fn(&[u8]),
) {
    let sectors = size(&open(Arc::new(MemStorage::new(good.to_vec())), Path::new("x")).unwrap());
    let base = vec![0x5au8; sectors as usize];
    assert!(
        first_error(good, Path::new("good"), open, size, map).is_none(),
        "{kind}: the undamaged delta reads"
    );
    let mut failures = Vec::new();
    for (name, damage, words, qemu) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut b = good.to_vec();
        damage(&mut b);
        exercise(&b);
        let chain = build::write_chain(dir.path(), &base, create_type, extent_type, &b);
        match first_error(&b, &chain.extent, open, size, map) {
            None => failures.push(format!("{kind} {name}: no error")),
            Some(e) => {
                let msg = e.to_string();
                if !msg.contains(p(&chain.extent)) || msg.contains('\n') {
                    failures.push(format!(
                        "{kind} {name}: not one line naming the file: {msg}"
                    ));
                }
                if !msg.contains(words) {
                    failures.push(format!("{kind} {name}: {msg:?} lacks {words:?}"));
                }
            }
        }
        let out = dir.path().join("out.raw");
        let (info, info_out) = run_status("qemu-img", &["info", p(&chain.delta)]);
        let (convert, _) = run_status(
            "qemu-img",
            &["convert", "-O", "raw", p(&chain.delta), p(&out)],
        );
        let ok = match qemu {
            Qemu::RefusesOpen => info != 0 && info_out.contains(words),
            Qemu::FailsRead => info == 0 && convert != 0,
            Qemu::Accepts => info == 0,
            Qemu::Any => true,
        };
        if !ok {
            failures.push(format!(
                "{kind} {name}: qemu-img info {info}, convert {convert}: {info_out}"
            ));
        }
    }
    common::assert_no_failures(&failures);
}

#[test]
fn damaged_sesparse_deltas_are_refused() {
    if !qemu_available("vmdk_esx hostile sesparse") {
        return;
    }
    // 40 MiB: three grain tables' worth, the GD one sector; grains of each kind.
    let grains = vec![
        (0, Grain::Data(vec![1; 4096])),
        (1, Grain::Zero),
        (2, Grain::Unmapped),
        (4096 * 2 + 7, Grain::Data(vec![2; 4096])),
    ];
    let (good, l) = build::sesparse(40 << 11, &grains, 0);
    let gd = l.gd * 512;
    // GD entry 0's grain table is stored second (GT number 1: tables are stored in reverse
    // order of first use).
    let gt0 = (l.gts + 64) * 512;
    let cases: Vec<Case> = vec![
        (
            "bad-magic",
            Box::new(|b| b[0] ^= 1),
            "Bad const header magic",
            Qemu::RefusesOpen,
        ),
        (
            "bad-version",
            Box::new(|b| put64(b, 8, 0x0000_0003_0000_0001)),
            "Unsupported version",
            Qemu::RefusesOpen,
        ),
        (
            "grain-size-16",
            Box::new(|b| put64(b, 24, 16)),
            "Unsupported grain size",
            Qemu::RefusesOpen,
        ),
        (
            "gt-size-32",
            Box::new(|b| put64(b, 32, 32)),
            "Unsupported grain table size",
            Qemu::RefusesOpen,
        ),
        (
            "flags",
            Box::new(|b| put64(b, 40, 1)),
            "Unsupported flags",
            Qemu::RefusesOpen,
        ),
        (
            "reserved",
            Box::new(|b| put64(b, 64, 1)),
            "Unsupported reserved bits",
            Qemu::RefusesOpen,
        ),
        (
            "const-padding",
            Box::new(|b| b[500] = 1),
            "Unsupported non-zero const header padding",
            Qemu::RefusesOpen,
        ),
        (
            "volatile-magic",
            Box::new(|b| b[512] ^= 1),
            "Bad volatile header magic",
            Qemu::RefusesOpen,
        ),
        (
            "replay-journal",
            Box::new(|b| put64(b, 512 + 24, 1)),
            "Image is dirty, Replaying journal not supported",
            Qemu::RefusesOpen,
        ),
        (
            "volatile-padding",
            Box::new(|b| b[1000] = 1),
            "Unsupported non-zero volatile header padding",
            Qemu::RefusesOpen,
        ),
        (
            "huge-gd",
            Box::new(|b| put64(b, 136, 1 << 20)),
            "L1 size too big",
            Qemu::RefusesOpen,
        ),
        (
            "volatile-past-eof",
            Box::new(|b| put64(b, 80, 1 << 40)),
            "Bad volatile header magic",
            Qemu::RefusesOpen,
        ),
        (
            "gd-past-eof",
            Box::new(|b| put64(b, 128, 1 << 40)),
            "grain directory",
            Qemu::Accepts,
        ),
        (
            "huge-capacity",
            Box::new(|b| put64(b, 16, u64::MAX)),
            "too large",
            Qemu::Any,
        ),
        (
            "capacity-past-gd",
            Box::new(|b| put64(b, 16, 1 << 30)),
            "grain directory",
            Qemu::FailsRead,
        ),
        (
            "gd-entry-bad-type",
            Box::new(move |b| put64(b, gd, 0x2000_0000_0000_0001)),
            "grain directory entry",
            Qemu::FailsRead,
        ),
        (
            "gd-entry-gt-past-eof",
            Box::new(move |b| put64(b, gd, 0x1000_0000_00ff_ffff)),
            "past the end of the file",
            Qemu::Accepts,
        ),
        (
            "gd-entry-gt-past-32-bits",
            Box::new(move |b| put64(b, gd, 0x1000_0000_ffff_ffff)),
            "past the end of the file",
            Qemu::FailsRead,
        ),
        (
            "gt-entry-past-eof",
            Box::new(move |b| put64(b, gt0, 0x3000_0000_00ff_ffff)),
            "past the end of the file",
            Qemu::Accepts,
        ),
        (
            "gt-entry-type-4",
            Box::new(move |b| put64(b, gt0 + 8, 0x4000_0000_0000_0000)),
            "grain table entry",
            Qemu::FailsRead,
        ),
        (
            "gt-entry-type-0-nonzero",
            Box::new(move |b| put64(b, gt0 + 8 * 5, 0x0000_0000_0000_0010)),
            "grain table entry",
            Qemu::FailsRead,
        ),
    ];
    check_cases(
        "seSparse",
        "seSparse",
        "SESPARSE",
        &good,
        cases,
        vimg::vmdk::sesparse::SeSparseExtent::open,
        vimg::vmdk::sesparse::SeSparseExtent::size,
        vimg::vmdk::sesparse::SeSparseExtent::map,
        vimg::vmdk::sesparse::exercise,
    );
}

#[test]
fn damaged_vmfs_sparse_deltas_are_refused() {
    if !qemu_available("vmdk_esx hostile vmfsSparse") {
        return;
    }
    // 8 MiB of 512-byte grains: four grain tables' worth.
    let grains = vec![
        (0, vec![1; 512]),
        (1, vec![2; 512]),
        (4096 * 3 + 5, vec![3; 512]),
    ];
    let (good, l) = build::cowd(8 << 11, 1, &grains);
    let gd = l.gd * 512;
    // The first grain table used (GD entry 0) is the last one stored.
    let gt0 = (l.gts + 32) * 512;
    let cases: Vec<Case> = vec![
        (
            "bad-magic",
            Box::new(|b| b[0] = b'X'),
            "Image not in VMDK format",
            Qemu::RefusesOpen,
        ),
        (
            "granularity-huge",
            Box::new(|b| put32(b, 16, 0x20_0001)),
            "Invalid granularity, image may be corrupt",
            Qemu::RefusesOpen,
        ),
        (
            "huge-gd",
            Box::new(|b| put32(b, 24, 0x200_0001)),
            "L1 size too big",
            Qemu::RefusesOpen,
        ),
        (
            "gd-past-eof",
            Box::new(|b| put32(b, 20, 0x00ff_ffff)),
            "grain directory",
            Qemu::Accepts,
        ),
        (
            "capacity-past-gd",
            Box::new(|b| put32(b, 12, 1 << 20)),
            "grain directory",
            Qemu::FailsRead,
        ),
        (
            "gd-entry-gt-past-eof",
            Box::new(move |b| put32(b, gd, 0x00ff_ffff)),
            "past the end of the file",
            Qemu::Accepts,
        ),
        (
            "gt-entry-past-eof",
            Box::new(move |b| put32(b, gt0 + 4, 0x00ff_ffff)),
            "past the end of the file",
            Qemu::Accepts,
        ),
        (
            "truncated",
            Box::new(|b| b.truncate(20)),
            "grain directory",
            Qemu::FailsRead,
        ),
    ];
    check_cases(
        "vmfsSparse",
        "vmfsSparse",
        "VMFSSPARSE",
        &good,
        cases,
        vimg::vmdk::cowd::CowdExtent::open,
        vimg::vmdk::cowd::CowdExtent::size,
        vimg::vmdk::cowd::CowdExtent::map,
        vimg::vmdk::cowd::exercise,
    );
}

/// A granularity of 0 is refused (qemu divides by it when it reads).
#[test]
fn cowd_granularity_zero_is_refused() {
    let (mut b, _) = build::cowd(8 << 11, 1, &[(0, vec![1; 512])]);
    put32(&mut b, 16, 0);
    vimg::vmdk::cowd::exercise(&b);
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(b));
    let e = vimg::vmdk::cowd::CowdExtent::open(storage, Path::new("d.vmdk"))
        .err()
        .expect("granularity 0 refused");
    assert!(e.to_string().contains("Invalid granularity"), "{e}");
}

/// Writes the fuzz seed corpora (fuzz/corpus/vmdk_cowd, fuzz/corpus/vmdk_sesparse) from the
/// builders when `VIMG_WRITE_SEEDS=1`; otherwise checks the committed seeds are what the
/// builders make.
#[test]
fn fuzz_seeds_are_the_built_deltas() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let (se, _) = build::sesparse(
        2 << 11,
        &[
            (0, Grain::Data(vec![0xaa; 4096])),
            (1, Grain::Zero),
            (2, Grain::Unmapped),
            (300, Grain::Data(vec![0x55; 4096])),
        ],
        0,
    );
    let (cowd, _) = build::cowd(
        4 << 11,
        1,
        &[(3, vec![0xaa; 512]), (4096 + 9, vec![0x55; 512])],
    );
    let seeds = [
        ("vmdk_sesparse", "seed-built-2M", se),
        ("vmdk_cowd", "seed-built-4M", cowd),
    ];
    for (target, name, bytes) in seeds {
        let path = root.join(target).join(name);
        if std::env::var("VIMG_WRITE_SEEDS").as_deref() == Ok("1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        assert!(
            std::fs::read(&path).ok().as_deref() == Some(&bytes[..]),
            "{} is not what the builder makes: rerun with VIMG_WRITE_SEEDS=1",
            path.display()
        );
    }
}

/// The built deltas with their metadata (headers, grain directory, grain tables) randomly
/// damaged: the fuzz entries neither panic nor take long.
mod mutated {
    use super::build::{self, Grain};
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    /// A built delta: its kind, its bytes, where its metadata ends, its fuzz entry.
    type Delta = (&'static str, Vec<u8>, usize, fn(&[u8]));

    fn deltas() -> Vec<Delta> {
        let (se, l) = build::sesparse(
            40 << 11,
            &[
                (0, Grain::Data(vec![1; 4096])),
                (1, Grain::Zero),
                (2, Grain::Unmapped),
                (4096 * 2 + 7, Grain::Data(vec![2; 4096])),
            ],
            4094,
        );
        let se_meta = (l.grains * 512) as usize;
        let (cowd, l) = build::cowd(
            8 << 11,
            1,
            &[
                (0, vec![1; 512]),
                (1, vec![2; 512]),
                (4096 * 3 + 5, vec![3; 512]),
            ],
        );
        let cowd_meta = (l.grains * 512) as usize;
        vec![
            ("seSparse", se, se_meta, vimg::vmdk::sesparse::exercise),
            ("vmfsSparse", cowd, cowd_meta, vimg::vmdk::cowd::exercise),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn damaged_metadata_never_panics(
            which in any::<bool>(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
        ) {
            let mut all = deltas();
            let (name, mut bytes, meta, exercise) = all.swap_remove(usize::from(which));
            for (at, val) in edits {
                let i = at.index(meta);
                bytes[i] = val;
            }
            let start = Instant::now();
            let r = std::panic::catch_unwind(|| exercise(&bytes));
            prop_assert!(r.is_ok(), "panic on a damaged {}", name);
            prop_assert!(start.elapsed() < Duration::from_secs(10), "slow on a damaged {}", name);
        }
    }
}
