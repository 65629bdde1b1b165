//! Header extensions that appear more than once (issue 13, item 8; qemu-iotests 114).
//!
//! qemu reads every extension in turn and a later one replaces what an earlier one of the same
//! type said (block/qcow2.c, qcow2_read_extensions): the image opens, the last one wins, and a
//! header rewrite (`rebase -u`) stores each extension once. vimg refused such an image
//! ("header extension 0xe2792aca appears twice"), so it could not even repair it.
//!
//! Images are made by qemu-img; a second copy of an extension is appended to the header's
//! extension area (the backing file name after it is moved along). `vimg info` must show what
//! `qemu-img info` shows, `vimg rebase -u` must leave one extension of the type, and
//! `qemu-img check` must find nothing.

use crate::common;
use crate::common::header_fields;

use common::{qemu_available, qemu_create, run, run_status};
use std::path::{Path, PathBuf};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
const BACKING_FORMAT: u32 = 0xe279_2aca;
const FEATURE_TABLE: u32 = 0x6803_f857;
const DATA_FILE: u32 = 0x4441_5441;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vimg-dupext-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// The header extensions of the image at `p`, in order: (type, data).
fn extensions(p: &Path) -> Vec<(u32, Vec<u8>)> {
    let f = std::fs::read(p).unwrap();
    let mut off = be32(&f, header_fields::HEADER_LENGTH as usize) as usize;
    let mut out = Vec::new();
    loop {
        let (kind, len) = (be32(&f, off), be32(&f, off + 4) as usize);
        if kind == 0 {
            return out;
        }
        out.push((kind, f[off + 8..off + 8 + len].to_vec()));
        off += 8 + len.div_ceil(8) * 8;
    }
}

/// Rewrites the extension area of `p` as `exts` (the backing file name moves after them).
fn write_extensions(p: &Path, exts: &[(u32, Vec<u8>)]) {
    let mut f = std::fs::read(p).unwrap();
    let name_off = common::header_u64(&f, header_fields::BACKING_FILE_OFFSET) as usize;
    let name_len = be32(&f, header_fields::BACKING_FILE_SIZE as usize) as usize;
    let name = f[name_off..name_off + name_len].to_vec();
    let mut area = Vec::new();
    for (kind, data) in exts {
        area.extend(kind.to_be_bytes());
        area.extend((data.len() as u32).to_be_bytes());
        area.extend(data);
        area.resize(area.len().div_ceil(8) * 8, 0);
    }
    area.extend([0u8; 8]);
    let start = be32(&f, header_fields::HEADER_LENGTH as usize) as usize;
    let end = start + area.len();
    assert!(end + name.len() <= 4096, "the header no longer fits");
    f[start..4096].fill(0);
    f[start..end].copy_from_slice(&area);
    if name_len > 0 {
        f[end..end + name.len()].copy_from_slice(&name);
        let at = header_fields::BACKING_FILE_OFFSET as usize;
        f[at..at + 8].copy_from_slice(&(end as u64).to_be_bytes());
    }
    std::fs::write(p, f).unwrap();
}

/// Appends a second extension of `kind` with `data` to the image at `p`.
fn add_duplicate(p: &Path, kind: u32, data: &[u8]) {
    let mut exts = extensions(p);
    assert!(exts.iter().any(|e| e.0 == kind), "no {kind:#x} to repeat");
    exts.push((kind, data.to_vec()));
    write_extensions(p, &exts);
}

/// The value of the info line starting with `key` (e.g. "backing file format:").
fn info_value(out: &str, key: &str) -> Option<String> {
    out.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

#[test]
fn a_repeated_backing_format_is_read_as_qemu_reads_it_and_rebase_u_fixes_it() {
    if !qemu_available("duplicate backing format extension") {
        return;
    }
    let dir = tmpdir("bf");
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_create(&base, "qcow2", "", None, 64 << 20);
    qemu_create(&top, "qcow2", "", Some((&base, "qcow2")), 64 << 20);
    // As iotests 114: a second backing format names a driver that does not exist.
    add_duplicate(&top, BACKING_FORMAT, b"foo");
    let t = top.to_str().unwrap();
    let q = run("qemu-img", &["info", "-U", t]);
    let (code, v) = run_status(VIMG, &["info", "-U", t]);
    assert_eq!(code, 0, "vimg info refused the image: {v}");
    let key = "backing file format:";
    assert_eq!(info_value(&q, key).as_deref(), Some("foo"), "{q}");
    assert_eq!(info_value(&v, key), info_value(&q, key), "{v}");
    // As in iotests 114: without -F, both refuse with qemu-img's words.
    let b = base.to_str().unwrap();
    let (qcode, qout) = run_status("qemu-img", &["rebase", "-u", "-b", b, t]);
    let (code, out) = run_status(VIMG, &["rebase", "-u", "-b", b, t]);
    assert_eq!((code != 0, qcode != 0), (true, true), "{out} / {qout}");
    assert_eq!(out.replacen("vimg:", "qemu-img:", 1), qout);
    // rebase -u rewrites the header: one backing format extension, the new one.
    let (code, out) = run_status(VIMG, &["rebase", "-u", "-b", b, "-F", "qcow2", t]);
    assert_eq!(code, 0, "vimg rebase -u: {out}");
    let formats: Vec<_> = extensions(&top)
        .into_iter()
        .filter(|e| e.0 == BACKING_FORMAT)
        .map(|e| e.1)
        .collect();
    assert_eq!(formats, [b"qcow2".to_vec()]);
    let q = run("qemu-img", &["info", t]);
    assert_eq!(info_value(&q, key).as_deref(), Some("qcow2"), "{q}");
    let (code, out) = run_status("qemu-img", &["check", t]);
    assert_eq!(code, 0, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn repeated_data_file_and_feature_table_extensions_open_with_the_last_one() {
    if !qemu_available("duplicate data file extension") {
        return;
    }
    let dir = tmpdir("df");
    let img = dir.join("img.qcow2");
    let d1 = dir.join("d1.raw");
    let d2 = dir.join("d2.raw");
    qemu_create(
        &img,
        "qcow2",
        &format!("data_file={}", d1.display()),
        None,
        64 << 20,
    );
    std::fs::copy(&d1, &d2).unwrap();
    let table = extensions(&img)
        .into_iter()
        .find(|e| e.0 == FEATURE_TABLE)
        .unwrap()
        .1;
    add_duplicate(&img, FEATURE_TABLE, &table);
    add_duplicate(&img, DATA_FILE, d2.to_str().unwrap().as_bytes());
    let i = img.to_str().unwrap();
    let q = run("qemu-img", &["info", "-U", i]);
    let (code, v) = run_status(VIMG, &["info", "-U", i]);
    assert_eq!(code, 0, "vimg info refused the image: {v}");
    let key = "data file:";
    assert_eq!(
        info_value(&q, key).as_deref(),
        Some(d2.to_str().unwrap()),
        "{q}"
    );
    assert_eq!(info_value(&v, key), info_value(&q, key), "{v}");
    let (code, out) = run_status(VIMG, &["check", i]);
    assert_eq!(code, 0, "vimg check: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}
