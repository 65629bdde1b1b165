//! vimg against the committed fixtures in `test-images/` (made by `test-images/make-fixtures.sh`
//! with qemu 10.0.2; `manifest.json` holds what qemu said about each image). Needs no qemu.
//!
//! Every file of `test-images/` is materialised into one temporary directory (`.gz` files
//! decompressed, so that backing and data file names recorded in the images resolve), sparsely:
//! each all-zero 4 KiB block becomes a hole, which is the layout qemu was asked about (qemu's
//! block status reports host-file holes, see the script's README).
//!
//! - good images: contents (sha256 of the whole virtual disk), virtual size, and block status
//!   against `qemu-img map` (depth, present, zero, data, compressed, and the host offset of
//!   uncompressed data); ranges vimg calls zero must read as zero.
//! - bad images: opening (or else reading everything) must fail, without panicking, with an
//!   error message containing the manifest's `error_contains`.
//!
//! All images are tried and every mismatch is collected, so one run lists every problem.
//! `VIMG_FIXTURE=substring` restricts a run to matching image names. The `check` results in the
//! manifest are compared elsewhere (not here).

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tempfile::TempDir;
use vimg::block::{BlockImage, BlockStatus, ImageFormat};
use vimg::offsets::GuestOffset;
use vimg::open::{open_image, OpenOptions};

/// Granularity of the holes the fixtures were normalised to.
const HOLE_BLOCK: usize = 4096;
/// Read size when reading a whole disk.
const CHUNK: u64 = 1 << 20;
/// Map mismatches reported per image before summarising.
const MAX_MAP_REPORTS: usize = 8;
/// Time one image may take before it is reported as hanging.
const IMAGE_TIMEOUT: Duration = Duration::from_secs(120);

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("test-images")
}

/// The fixtures, materialised.
struct Fixtures {
    dir: TempDir,
    manifest: Value,
    /// Relative names of all materialised files, longest first (to scrub them from messages).
    names: Vec<String>,
    /// Whether the temporary directory's file system makes holes (else map checks are skipped).
    sparse: bool,
}

fn write_sparse(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let f = std::fs::File::create(path).unwrap();
    for (i, block) in data.chunks(HOLE_BLOCK).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, (i * HOLE_BLOCK) as u64).unwrap();
        }
    }
    f.set_len(data.len() as u64).unwrap();
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(root, &path, out);
        } else {
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
        }
    }
}

fn hole_support(dir: &Path) -> bool {
    let p = dir.join(".hole-probe");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[1u8; 4096], (1 << 20) - 4096).unwrap();
    f.sync_all().unwrap();
    let allocated = std::fs::metadata(&p).unwrap().blocks() * 512;
    std::fs::remove_file(&p).unwrap();
    allocated < (1 << 19)
}

fn materialise() -> Fixtures {
    let src = fixtures_dir();
    let manifest_text = std::fs::read_to_string(src.join("manifest.json"))
        .expect("test-images/manifest.json is missing: run test-images/make-fixtures.sh");
    let manifest: Value = serde_json::from_str(&manifest_text).expect("manifest.json is not JSON");
    let dir = tempfile::Builder::new()
        .prefix("vimg-fixtures")
        .tempdir()
        .unwrap();
    let mut files = Vec::new();
    collect_files(&src, &src, &mut files);
    let mut names = Vec::new();
    for rel in files {
        let name = rel.to_str().unwrap().to_string();
        if name == "manifest.json" || name.ends_with(".sh") || name.ends_with(".md") {
            continue;
        }
        let raw = std::fs::read(src.join(&rel)).unwrap();
        let (data, out_name) = match name.strip_suffix(".gz") {
            Some(stem) => {
                let mut d = Vec::new();
                flate2::read::GzDecoder::new(&raw[..])
                    .read_to_end(&mut d)
                    .unwrap_or_else(|e| panic!("cannot decompress {name}: {e}"));
                (d, stem.to_string())
            }
            None => (raw, name.clone()),
        };
        write_sparse(&dir.path().join(&out_name), &data);
        names.push(out_name);
    }
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let sparse = hole_support(dir.path());
    if !sparse {
        eprintln!(
            "WARNING: {} cannot make sparse files: block-status comparisons with qemu are skipped",
            dir.path().display()
        );
    }
    Fixtures {
        dir,
        manifest,
        names,
        sparse,
    }
}

fn images<'a>(fx: &'a Fixtures, kind: &str) -> Vec<&'a Value> {
    let filter = std::env::var("VIMG_FIXTURE").ok();
    let all = fx.manifest["images"]
        .as_array()
        .expect("manifest has no images list");
    assert!(!all.is_empty(), "manifest lists no images");
    all.iter()
        .filter(|e| e["kind"] == kind)
        .filter(|e| match &filter {
            Some(f) => e["name"].as_str().unwrap().contains(f.as_str()),
            None => true,
        })
        .collect()
}

fn format_of(e: &Value) -> ImageFormat {
    match e["format"].as_str().unwrap() {
        "raw" => ImageFormat::Raw,
        "qcow2" => ImageFormat::Qcow2,
        other => panic!("unknown format {other} in manifest"),
    }
}

fn open(path: &Path, format: Option<ImageFormat>) -> vimg::Result<Box<dyn BlockImage>> {
    open_image(
        path,
        &OpenOptions {
            format,
            ..Default::default()
        },
    )
}

/// Runs `f` on its own thread, turning a panic or a hang into a failure message.
fn guarded<F>(name: &str, f: F) -> Vec<String>
where
    F: FnOnce() -> Vec<String> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("fixture {name}"))
        .spawn(move || {
            let r = f();
            let _ = tx.send(r);
        })
        .unwrap();
    match rx.recv_timeout(IMAGE_TIMEOUT) {
        Ok(r) => {
            let _ = handle.join();
            r
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            vec![format!(
                "{name}: did not finish within {IMAGE_TIMEOUT:?} (hang?)"
            )]
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let msg = match handle.join() {
                Err(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into()),
                Ok(()) => "thread ended without an answer".into(),
            };
            vec![format!("{name}: PANICKED: {msg}")]
        }
    }
}

/// One range of qemu's map.
#[derive(Debug, Clone)]
struct QemuRange {
    start: u64,
    end: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

fn qemu_map(e: &Value) -> Vec<QemuRange> {
    e["map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let start = m["start"].as_u64().unwrap();
            QemuRange {
                start,
                end: start + m["length"].as_u64().unwrap(),
                depth: m["depth"].as_u64().unwrap(),
                present: m["present"].as_bool().unwrap(),
                zero: m["zero"].as_bool().unwrap(),
                data: m["data"].as_bool().unwrap(),
                compressed: m["compressed"].as_bool().unwrap_or(false),
                offset: m.get("offset").and_then(|o| o.as_u64()),
            }
        })
        .collect()
}

fn flags(depth: u64, present: bool, zero: bool, data: bool, compressed: bool) -> String {
    format!(
        "depth {depth} {}{}{}{}",
        if present { "present" } else { "absent" },
        if zero { " zero" } else { "" },
        if data { " data" } else { "" },
        if compressed { " compressed" } else { "" }
    )
}

/// Walks vimg's block status over the whole disk.
fn vimg_map(img: &dyn BlockImage, size: u64) -> Result<Vec<(u64, BlockStatus)>, String> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        let s = img
            .block_status(GuestOffset(off), size - off)
            .map_err(|e| format!("block_status({off:#x}, {:#x}) failed: {e}", size - off))?;
        if s.len == 0 || s.len > size - off {
            return Err(format!(
                "block_status({off:#x}, {:#x}) returned length {:#x}",
                size - off,
                s.len
            ));
        }
        if out.len() > 4_000_000 {
            return Err("block_status returned more than 4 million ranges".into());
        }
        out.push((off, s));
        off += s.len;
    }
    Ok(out)
}

/// Compares vimg's ranges with qemu's, over the union of their boundaries.
fn compare_maps(name: &str, vm: &[(u64, BlockStatus)], qm: &[QemuRange], end: u64) -> Vec<String> {
    let mut problems: Vec<String> = Vec::new();
    let mut count = 0usize;
    let mut last: Option<(u64, u64, String)> = None; // merged run of one kind of mismatch
    let mut flush = |last: &mut Option<(u64, u64, String)>, problems: &mut Vec<String>| {
        if let Some((s, e, what)) = last.take() {
            count += 1;
            if problems.len() < MAX_MAP_REPORTS {
                problems.push(format!("{name}: map [{s:#x}, {e:#x}): {what}"));
            }
        }
    };
    let (mut i, mut j) = (0usize, 0usize);
    let mut pos = 0u64;
    while pos < end && i < vm.len() && j < qm.len() {
        let (vs, v) = vm[i];
        let q = &qm[j];
        let v_end = vs + v.len;
        if q.end <= pos {
            j += 1;
            continue;
        }
        if v_end <= pos {
            i += 1;
            continue;
        }
        let seg_end = v_end.min(q.end).min(end);
        let mut what = Vec::new();
        let vf = flags(u64::from(v.depth), v.present, v.zero, v.data, v.compressed);
        let qf = flags(q.depth, q.present, q.zero, q.data, q.compressed);
        if vf != qf {
            what.push(format!("vimg says {vf}, qemu says {qf}"));
        }
        if q.data && !q.compressed {
            if let Some(qo) = q.offset {
                let want = qo + (pos - q.start);
                let got = v.offset.map(|o| o.0 + (pos - vs));
                if got != Some(want) {
                    what.push(format!(
                        "host offset {} (qemu {want:#x})",
                        got.map_or("none".to_string(), |g| format!("{g:#x}"))
                    ));
                }
            }
        }
        if what.is_empty() {
            flush(&mut last, &mut problems);
        } else {
            let what = what.join("; ");
            // host offsets differ per position: merge runs by the flag part only
            let key_same = matches!(&last, Some((_, e, w)) if *e == pos
                && (w == &what || (w.contains("host offset") && what.contains("host offset")
                    && w.split("host offset").next() == what.split("host offset").next())));
            if key_same {
                last.as_mut().unwrap().1 = seg_end;
            } else {
                flush(&mut last, &mut problems);
                last = Some((pos, seg_end, what));
            }
        }
        pos = seg_end;
    }
    flush(&mut last, &mut problems);
    if pos < end {
        problems.push(format!(
            "{name}: map comparison stopped at {pos:#x} of {end:#x}"
        ));
    }
    if count > problems.len() {
        problems.push(format!("{name}: ... {} map mismatches in all", count));
    }
    problems
}

fn check_good(e: &Value, dir: &Path, sparse: bool) -> Vec<String> {
    let name = e["name"].as_str().unwrap().to_string();
    let path = dir.join(&name);
    let mut fails = Vec::new();
    let img = match open(&path, Some(format_of(e))) {
        Ok(img) => img,
        Err(err) => return vec![format!("{name}: open failed: {err}")],
    };
    let want_size = e["virtual_size"].as_u64().unwrap();
    let size = img.virtual_size();
    if size != want_size {
        fails.push(format!(
            "{name}: virtual size {size}, qemu says {want_size}"
        ));
    }

    // contents
    let mut data = vec![0u8; size as usize];
    let mut read_ok = true;
    let mut off = 0u64;
    while off < size {
        let n = CHUNK.min(size - off);
        if let Err(err) = img.read_at(
            &mut data[off as usize..(off + n) as usize],
            GuestOffset(off),
        ) {
            fails.push(format!(
                "{name}: read of {n:#x} bytes at {off:#x} failed: {err}"
            ));
            read_ok = false;
            break;
        }
        off += n;
    }
    if read_ok {
        // qemu's view covers qemu's virtual size; compare over that
        let mut h = Sha256::new();
        let common = size.min(want_size) as usize;
        h.update(&data[..common]);
        if want_size > size {
            h.update(vec![0u8; (want_size - size) as usize]);
        }
        let got = hex::encode(h.finalize());
        if got != e["sha256"].as_str().unwrap() {
            let detail = if want_size != size {
                " (sizes differ; vimg's data zero-padded to qemu's size)".to_string()
            } else {
                String::new()
            };
            fails.push(format!(
                "{name}: contents differ from qemu's (sha256 {got}){detail}"
            ));
        }
    }

    // block status
    let vm = match vimg_map(img.as_ref(), size) {
        Ok(vm) => vm,
        Err(err) => {
            fails.push(format!("{name}: {err}"));
            return fails;
        }
    };
    if read_ok {
        for (s, st) in &vm {
            if st.zero {
                let r = &data[*s as usize..(*s + st.len) as usize];
                if let Some(p) = r.iter().position(|&b| b != 0) {
                    fails.push(format!(
                        "{name}: block status says [{s:#x}, {:#x}) is zero but byte {:#x} is not",
                        s + st.len,
                        *s + p as u64
                    ));
                }
            }
        }
    }
    if sparse {
        fails.extend(compare_maps(&name, &vm, &qemu_map(e), size.min(want_size)));
    }
    fails
}

/// The error message with the fixture directory and file names scrubbed (they would otherwise
/// match substrings such as "l1" by accident).
fn scrub(msg: &str, dir: &Path, names: &[String]) -> String {
    let mut m = msg.replace(&format!("{}/", dir.display()), "");
    m = m.replace(&dir.display().to_string(), "<dir>");
    for n in names {
        m = m.replace(n.as_str(), "<file>");
    }
    m.to_lowercase()
}

fn check_bad(e: &Value, dir: &Path, names: &[String]) -> Vec<String> {
    let name = e["name"].as_str().unwrap().to_string();
    let path = dir.join(&name);
    let want = e["error_contains"].as_str().unwrap().to_lowercase();
    let mut fails = Vec::new();
    let is_qcow2_magic = std::fs::read(&path)
        .map(|d| d.len() >= 4 && d[..4] == *b"QFI\xfb")
        .unwrap_or(false);
    let mut attempts = vec![("format given", Some(format_of(e)))];
    if is_qcow2_magic || format_of(e) == ImageFormat::Raw {
        // probing a file without qcow2 magic rightly opens it as raw
        attempts.push(("format probed", None));
    }
    for (how, format) in attempts {
        let err = match open(&path, format) {
            Err(err) => err,
            Ok(img) => {
                let size = img.virtual_size();
                let mut buf = vec![0u8; CHUNK as usize];
                let mut off = 0u64;
                let mut failure = None;
                while off < size {
                    let n = CHUNK.min(size - off);
                    if let Err(err) = img.read_at(&mut buf[..n as usize], GuestOffset(off)) {
                        failure = Some(err);
                        break;
                    }
                    off += n;
                }
                match failure {
                    Some(err) => err,
                    None => {
                        fails.push(format!(
                            "{name} ({how}): opened and read all {size} bytes without an error \
                             (expected one containing {want:?})"
                        ));
                        continue;
                    }
                }
            }
        };
        let msg = err.to_string();
        if !scrub(&msg, dir, names).contains(&want) {
            fails.push(format!(
                "{name} ({how}): error does not contain {want:?}: {msg}"
            ));
        }
    }
    fails
}

fn report(what: &str, n: usize, fails: Vec<String>) {
    if !fails.is_empty() {
        panic!(
            "{} problem(s) with {n} {what} fixture images:\n  {}",
            fails.len(),
            fails.join("\n  ")
        );
    }
    eprintln!("{n} {what} fixture images OK");
}

/// Every image qemu reads: vimg reads the same bytes and reports the same block status.
#[test]
fn fixtures_good_images() {
    let fx = materialise();
    let list = images(&fx, "good");
    let mut fails = Vec::new();
    for e in &list {
        let e = (*e).clone();
        let dir = fx.dir.path().to_path_buf();
        let sparse = fx.sparse;
        let name = e["name"].as_str().unwrap().to_string();
        fails.extend(guarded(&name, move || check_good(&e, &dir, sparse)));
    }
    report("good", list.len(), fails);
}

/// Every hostile or unsupported image: a clean error naming the problem, never a panic.
#[test]
fn fixtures_bad_images() {
    let fx = materialise();
    let list = images(&fx, "bad");
    let mut fails = Vec::new();
    for e in &list {
        let e = (*e).clone();
        let dir = fx.dir.path().to_path_buf();
        let names = fx.names.clone();
        let name = e["name"].as_str().unwrap().to_string();
        fails.extend(guarded(&name, move || check_bad(&e, &dir, &names)));
    }
    report("bad", list.len(), fails);
}

/// The manifest is complete: every entry names a committed file and has the fields the tests
/// above (and the check tests) rely on.
#[test]
fn fixtures_manifest_complete() {
    let src = fixtures_dir();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json")).unwrap()).unwrap();
    let mut fails = Vec::new();
    for e in manifest["images"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap_or("?");
        let file = e["file"].as_str().unwrap_or("");
        if !src.join(file).is_file() {
            fails.push(format!("{name}: file {file:?} is missing"));
        }
        let needed: &[&str] = match e["kind"].as_str() {
            Some("good") if e["format"] == "qcow2" => &[
                "sha256",
                "virtual_size",
                "map",
                "info",
                "check",
                "check_exit",
                "features",
            ],
            Some("good") => &["sha256", "virtual_size", "map", "info", "features"],
            Some("bad") => &["error_contains", "qemu_info_exit", "features"],
            _ => {
                fails.push(format!("{name}: kind is neither good nor bad"));
                continue;
            }
        };
        for k in needed {
            if e.get(*k).is_none() {
                fails.push(format!("{name}: no {k}"));
            }
        }
    }
    assert!(
        fails.is_empty(),
        "manifest problems:\n  {}",
        fails.join("\n  ")
    );
}
