//! Helpers for the tests of encrypted images (qcow2 legacy AES and LUKS): running qemu and vimg
//! with `--object secret`s and `--image-opts`, reading what qemu reads, opening with the keys.

use super::{self as common, Rng};
use std::path::Path;
use vimg::open::{open_image, OpenOptions};
use vimg::opener::{EncryptOptions, Opener};
use vimg::{BlockImage, GuestOffset};

/// The `--object` text of the secret `id` holding `pw`.
pub fn secret(id: &str, pw: &str) -> String {
    format!("secret,id={id},data={pw}")
}

/// `--image-opts` for a qcow2 image with its key, and the backing file's if it has one.
pub fn spec(path: &Path, id: &str, backing_id: Option<&str>) -> String {
    let mut s = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret={id}",
        path.display()
    );
    if let Some(b) = backing_id {
        s.push_str(&format!(",backing.encrypt.key-secret={b}"));
    }
    s
}

/// Runs `prog` with `--object` for each secret in front of `args`.
pub fn with_objects(prog: &str, sub: &[&str], objects: &[String], args: &[&str]) -> (i32, String) {
    let mut a: Vec<String> = sub.iter().map(|s| s.to_string()).collect();
    for o in objects {
        a.push("--object".into());
        a.push(o.clone());
    }
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    common::run_status(prog, &a)
}

pub fn ok(r: (i32, String), what: &str) -> String {
    assert_eq!(r.0, 0, "{what}: {}", r.1);
    r.1
}

/// qemu-io commands on an image given by `--image-opts`.
pub fn qemu_io(objects: &[String], spec: &str, cmds: &[String]) {
    let mut args = vec!["--image-opts".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(spec.to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(with_objects("qemu-io", &[], objects, &a), "qemu-io");
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
}

/// The guest contents as qemu reads them.
pub fn qemu_read(objects: &[String], spec: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-read.raw");
    ok(
        with_objects(
            "qemu-img",
            &["convert"],
            objects,
            &["--image-opts", spec, "-O", "raw", out.to_str().unwrap()],
        ),
        "qemu-img convert",
    );
    let d = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    d
}

/// An opener holding the secrets `keys` (id, passphrase) and, for each image, the id of its
/// key.
pub fn opener(keys: &[(&str, &str)], images: &[(&Path, &str)]) -> Opener {
    let o = Opener::new();
    let objects: Vec<String> = keys.iter().map(|(i, p)| secret(i, p)).collect();
    o.set_secrets(vimg::secret::Secrets::from_objects(&objects).unwrap());
    for (p, id) in images {
        o.set_encryption(
            p,
            EncryptOptions {
                key_secret: Some(id.to_string()),
                format: None,
            },
        );
    }
    o
}

pub fn open(path: &Path, opener: &Opener, writable: bool) -> Box<dyn BlockImage> {
    open_image(
        path,
        &OpenOptions {
            writable,
            opener: opener.clone(),
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

pub fn read_all(img: &dyn BlockImage) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut buf, GuestOffset(0)).unwrap();
    buf
}

/// Random qemu-io writes (patterns at any byte offset and length) and zero writes.
pub fn random_io(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let off = rng.below(size - 1);
            let len = 1 + rng.below((size - off).min(200_000));
            match rng.below(5) {
                0 => format!("write -z {off} {len}"),
                _ => format!("write -P {} {off} {len}", 1 + rng.below(254)),
            }
        })
        .collect()
}

pub fn qemu_check(objects: &[String], spec: &str) {
    let (code, out) = with_objects("qemu-img", &["check"], objects, &["--image-opts", spec]);
    assert_eq!(code, 0, "qemu-img check: {out}");
}

/// The first line of stderr of a failed run, with the program's name taken off.
pub fn message(r: (i32, String)) -> (i32, String) {
    let line =
        r.1.lines()
            .find(|l| l.contains("qemu-img:") || l.contains("vimg:"))
            .unwrap_or("")
            .to_string();
    let line = line
        .split_once(": ")
        .map(|(_, rest)| rest.to_string())
        .unwrap_or(line);
    (r.0, line)
}

/// `n` random writes, zero writes and discards through `img`, applied to `model` too (a
/// discarded range reads as the driver chooses: vimg's reading is taken, which qemu must then
/// read too).
pub fn random_writes(img: &dyn BlockImage, model: &mut [u8], rng: &mut Rng, n: usize) {
    let size = model.len() as u64;
    for _ in 0..n {
        let off = rng.below(size - 1);
        let len = 1 + rng.below((size - off).min(150_000));
        let r = off as usize..(off + len) as usize;
        match rng.below(6) {
            0 => {
                img.write_zeroes(GuestOffset(off), len, rng.below(2) == 0)
                    .unwrap();
                model[r].fill(0);
            }
            1 => {
                img.discard(GuestOffset(off), len).unwrap();
                img.read_at(&mut model[r], GuestOffset(off)).unwrap();
            }
            _ => {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                img.write_at(&data, GuestOffset(off)).unwrap();
                model[r].copy_from_slice(&data);
            }
        }
    }
}

/// vimg's and qemu-img's `convert -l SNAPSHOT` of the image `spec` give the same bytes.
pub fn snapshot_reads_agree(objects: &[String], spec: &str, snapshot: &str, dir: &Path) {
    let out = dir.join("snap.raw");
    let qout = dir.join("qsnap.raw");
    let vimg = env!("CARGO_BIN_EXE_vimg");
    for (prog, o) in [(vimg, &out), ("qemu-img", &qout)] {
        let args = [
            "-l",
            snapshot,
            "--image-opts",
            spec,
            "-O",
            "raw",
            o.to_str().unwrap(),
        ];
        ok(with_objects(prog, &["convert"], objects, &args), prog);
    }
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&qout).unwrap());
}
