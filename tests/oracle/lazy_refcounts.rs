//! Lazy refcounts (qcow2.rst: compatible feature bit 0, incompatible "dirty" bit 0) against
//! qemu: vimg sets the dirty bit before its first metadata write and keeps refcounts in memory
//! across flushes (a copy of the file taken after a flush has stale refcounts that
//! `qemu-img check` reports), a clean close writes them and clears the bit (`qemu-img check`
//! exit 0), a dirty image opens read-only as it is and is repaired by a read-write open (by
//! vimg and by qemu alike, each accepting the other's dirty images).

use crate::common;
use crate::common::header_fields;

use common::crashing::{Crashing, Mode};
use common::{qemu_available, qemu_contents, qemu_create, qemu_io, run};
use std::path::Path;
use std::process::Command;
use vimg::open::ChainGuard;
use vimg::qcow2::Qcow2Image;
use vimg::storage::FileStorage;
use vimg::{BlockImage, GuestOffset};

/// Incompatible feature bits of the header on disk.
fn incompat(path: &Path) -> u64 {
    let b = std::fs::read(path).unwrap();
    common::header_u64(&b, header_fields::INCOMPATIBLE_FEATURES)
}

fn check_code(path: &Path) -> (i32, String) {
    common::run_status("qemu-img", &["check", path.to_str().unwrap()])
}

fn open_rw(path: &Path) -> Qcow2Image {
    Qcow2Image::open(path, true, false, &mut ChainGuard::default()).unwrap()
}

/// Writes a pattern over new clusters, a new L2 table's range and qemu's data, plus a zero
/// write and a discard (which free clusters); returns the expected contents.
fn scribble(img: &Qcow2Image, model: &mut [u8]) {
    let mut put = |off: usize, len: usize, b: u8| {
        img.write_at(&vec![b; len], GuestOffset(off as u64))
            .unwrap();
        model[off..off + len].fill(b);
    };
    put(100_000, 300_000, 0x51);
    put(9 << 20, 128 << 10, 0x52);
    put(4096, 4096, 0x53);
    img.write_zeroes(GuestOffset(1 << 20), 1 << 20, true)
        .unwrap();
    model[1 << 20..2 << 20].fill(0);
    img.discard(GuestOffset(3 << 20), 1 << 20).unwrap();
    model[3 << 20..4 << 20].fill(0);
}

fn base_image(dir: &Path, opts: &str) -> (std::path::PathBuf, Vec<u8>) {
    let p = dir.join("lazy.qcow2");
    let size = 16u64 << 20;
    qemu_create(&p, "qcow2", opts, None, size);
    qemu_io(&p, "qcow2", &["write -P 0x41 0 4M".into()]);
    let mut model = vec![0u8; size as usize];
    model[..4 << 20].fill(0x41);
    (p, model)
}

#[test]
fn a_clean_close_writes_refcounts_and_clears_the_dirty_bit() {
    if !qemu_available("lazy_refcounts") {
        return;
    }
    for opts in [
        "lazy_refcounts=on",
        "lazy_refcounts=on,cluster_size=4096,refcount_bits=4",
        "lazy_refcounts=on,extended_l2=on",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (p, mut model) = base_image(dir.path(), opts);
        let img = open_rw(&p);
        assert_eq!(incompat(&p) & 1, 0, "{opts}: dirty before any write");
        scribble(&img, &mut model);
        img.flush().unwrap();
        assert_eq!(incompat(&p) & 1, 1, "{opts}: not dirty after a flush");
        img.close().unwrap();
        assert_eq!(incompat(&p) & 1, 0, "{opts}: still dirty after close");
        let (code, out) = check_code(&p);
        assert_eq!(code, 0, "{opts}: {out}");
        assert!(qemu_contents(&p, dir.path()) == model, "{opts}: contents");
        // Dropping without an explicit close is a clean close too.
        let img = open_rw(&p);
        img.write_at(&[7u8; 512], GuestOffset(12 << 20)).unwrap();
        model[12 << 20..(12 << 20) + 512].fill(7);
        drop(img);
        assert_eq!(incompat(&p) & 1, 0, "{opts}: dirty after drop");
        let (code, out) = check_code(&p);
        assert_eq!(code, 0, "{opts}: {out}");
        assert!(qemu_contents(&p, dir.path()) == model, "{opts}: contents");
    }
}

/// Opens `p` for writing through a storage that fails every write after the first `limit`,
/// writes the scribble and flushes, then ends the session through `dyn BlockImage::finish`:
/// returns how many writes were made before the finish, and what the finish returned.
fn finish_through(p: &Path, limit: u64) -> (u64, vimg::Result<()>) {
    let storage = Crashing::new(FileStorage::open(p, true).unwrap(), limit, Mode::Fail);
    let writes = storage.writes.clone();
    let img = Qcow2Image::open_storage(
        Box::new(storage),
        p,
        true,
        false,
        &mut ChainGuard::default(),
    )
    .unwrap();
    let mut model = vec![0u8; img.virtual_size() as usize];
    scribble(&img, &mut model);
    img.flush().unwrap();
    let before = writes.load(std::sync::atomic::Ordering::SeqCst);
    let image: &dyn BlockImage = &img;
    (before, image.finish())
}

#[test]
fn finish_through_the_trait_writes_refcounts_and_reports_a_failure() {
    if !qemu_available("lazy_refcounts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = base_image(dir.path(), "lazy_refcounts=on");
    let pristine = dir.path().join("pristine.qcow2");
    std::fs::copy(&p, &pristine).unwrap();
    // A storage that never fails: finish leaves the image clean, as a close does.
    let (before, r) = finish_through(&p, u64::MAX);
    r.unwrap();
    assert_eq!(incompat(&p) & 1, 0, "still dirty after finish");
    let (code, out) = check_code(&p);
    assert_eq!(code, 0, "{out}");
    // The same session on a storage that fails from the finish's first write on: the error
    // reaches the caller (a drop would have swallowed it), naming the file.
    std::fs::copy(&pristine, &p).unwrap();
    let (again, r) = finish_through(&p, before);
    assert_eq!(
        again, before,
        "the session before finish is not deterministic"
    );
    let e = r.expect_err("a failed finish reported success");
    assert!(e.to_string().contains("lazy.qcow2"), "{e}");
    assert_eq!(incompat(&p) & 1, 1, "a failed finish cleared the dirty bit");
}

#[test]
fn refcounts_are_deferred_and_a_dirty_copy_is_repaired_by_vimg_and_by_qemu() {
    if !qemu_available("lazy_refcounts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, mut model) = base_image(dir.path(), "lazy_refcounts=on,cluster_size=65536");
    let img = open_rw(&p);
    scribble(&img, &mut model);
    img.flush().unwrap();
    // A "crash" right after the flush: the file as it is now.
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&p, &crashed).unwrap();
    img.close().unwrap();
    assert_eq!(incompat(&crashed) & 1, 1);

    // The refcounts on disk are stale: qemu's check (read-only, no repair) sees it.
    let (code, out) = check_code(&crashed);
    assert_ne!(code, 0, "refcounts were written at flush: {out}");

    // Read-only opens work as they are, by vimg and qemu.
    let ro = vimg::open::open_image(&crashed, &Default::default()).unwrap();
    let mut got = vec![0u8; model.len()];
    ro.read_at(&mut got, GuestOffset(0)).unwrap();
    assert!(got == model, "read-only contents of the dirty image");
    drop(ro);
    assert!(qemu_contents(&crashed, dir.path()) == model);
    assert_eq!(
        incompat(&crashed) & 1,
        1,
        "a read-only open changed the header"
    );

    // qemu repairs vimg's dirty image when it opens it read-write.
    let by_qemu = dir.path().join("by-qemu.qcow2");
    std::fs::copy(&crashed, &by_qemu).unwrap();
    qemu_io(&by_qemu, "qcow2", &["write -P 0x61 0 512".into()]);
    let (code, out) = check_code(&by_qemu);
    assert_eq!(code, 0, "after qemu's repair: {out}");
    let mut m2 = model.clone();
    m2[..512].fill(0x61);
    assert!(qemu_contents(&by_qemu, dir.path()) == m2);

    // vimg repairs it too, and the image is clean after.
    let img = open_rw(&crashed);
    assert_eq!(
        incompat(&crashed) & 1,
        0,
        "not marked clean after the repair"
    );
    let mut got = vec![0u8; model.len()];
    img.read_at(&mut got, GuestOffset(0)).unwrap();
    assert!(got == model, "contents after the repair");
    img.write_at(&[0x62; 1000], GuestOffset(15 << 20)).unwrap();
    model[15 << 20..(15 << 20) + 1000].fill(0x62);
    img.close().unwrap();
    let (code, out) = check_code(&crashed);
    assert_eq!(code, 0, "after vimg's repair: {out}");
    assert!(qemu_contents(&crashed, dir.path()) == model);
}

#[test]
fn vimg_repairs_a_dirty_image_left_by_qemu() {
    if !qemu_available("lazy_refcounts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    qemu_create(&p, "qcow2", "lazy_refcounts=on", None, 8 << 20);
    // qemu-io's `abort` leaves the image as a crash would: dirty, refcounts not written.
    let out = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x33 0 3M",
            "-c",
            "flush",
            "-c",
            "abort",
            p.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "abort did not abort");
    assert_eq!(incompat(&p) & 1, 1, "qemu left no dirty image");
    assert_ne!(
        check_code(&p).0,
        0,
        "qemu's dirty image has correct refcounts"
    );
    let img = open_rw(&p);
    let mut got = vec![0u8; 3 << 20];
    img.read_at(&mut got, GuestOffset(0)).unwrap();
    assert!(got.iter().all(|&b| b == 0x33));
    img.write_at(&[0x34; 4096], GuestOffset(5 << 20)).unwrap();
    img.close().unwrap();
    let (code, out) = check_code(&p);
    assert_eq!(code, 0, "{out}");
    assert_eq!(incompat(&p) & 1, 0);
    run(
        "qemu-io",
        &["-c", "read -P 0x34 5M 4k", p.to_str().unwrap()],
    );
}
