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
    // A name of its own for each call: tests read from several threads into one directory.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = dir.join(format!("qemu-read-{n}.raw"));
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

/// The LUKS create options qemu 10 accepts, one combination each, as raw LUKS's `-o` takes
/// them (without key-secret/iter-time; qcow2 takes them after `encrypt.`): every cipher with
/// every mode, the IV generators, every hash.
pub fn luks_combos() -> Vec<String> {
    let mut v = Vec::new();
    // Every cipher with every mode qemu makes images with (plain64, sha256). qemu 10.0.2
    // aborts on 192-bit ciphers but with XTS (their key material is not whole sectors), and
    // CAST5's 8-byte blocks rule XTS out.
    for alg in [
        "aes-128",
        "aes-192",
        "aes-256",
        "cast5-128",
        "serpent-128",
        "serpent-192",
        "serpent-256",
        "twofish-128",
        "twofish-192",
        "twofish-256",
    ] {
        for mode in ["xts", "cbc", "ecb", "ctr"] {
            let q192 = alg.ends_with("-192") && mode != "xts";
            let cast_xts = alg == "cast5-128" && mode == "xts";
            if !q192 && !cast_xts {
                v.push(format!("cipher-alg={alg},cipher-mode={mode}"));
            }
        }
    }
    // The IV generators: plain, and ESSIV with each hash whose digest is a key size of the
    // cipher's family (its cipher then sized by the digest: aes-128 data, aes-256 ESSIV).
    for o in [
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5",
        "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=sha256",
        "cipher-alg=serpent-256,cipher-mode=ctr,ivgen-alg=essiv,ivgen-hash-alg=md5",
        "cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
        "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5",
        "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain",
        "cipher-alg=twofish-256,cipher-mode=xts,ivgen-alg=plain",
        "cipher-alg=cast5-128,cipher-mode=ctr,ivgen-alg=plain",
    ] {
        v.push(o.to_string());
    }
    // Every PBKDF2 / anti-forensic hash.
    for h in ["md5", "sha1", "sha224", "sha384", "sha512", "ripemd160"] {
        v.push(format!("hash-alg={h}"));
    }
    v
}

/// Runs `f` on every item, on two threads.
pub fn parallel<T: Sync>(items: &[T], f: impl Fn(&T) -> Vec<String> + Sync) -> Vec<String> {
    let mid = items.len() / 2;
    std::thread::scope(|s| {
        let (a, b) = items.split_at(mid);
        let f = &f;
        let ha = s.spawn(move || a.iter().flat_map(f).collect::<Vec<_>>());
        let hb = s.spawn(move || b.iter().flat_map(f).collect::<Vec<_>>());
        let mut v = ha.join().unwrap();
        v.extend(hb.join().unwrap());
        v
    })
}

/// The `-o` options qemu-img creates a qcow2 image encrypted with `encrypt.format=aes` with.
pub const AES: &str = "encrypt.format=aes,encrypt.key-secret=k";
/// The `-o` options qemu-img creates a LUKS qcow2 image with (a short PBKDF2 time).
pub const LUKS: &str = "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10";

/// qemu-img create of a qcow2 image encrypted as `encryption` says ([`AES`] or [`LUKS`]) with
/// passphrase `pw` (extra `-o` options, a qcow2 backing file).
pub fn qemu_create_encrypted(
    encryption: &str,
    path: &Path,
    pw: &str,
    size: u64,
    extra: &str,
    backing: Option<&Path>,
) {
    let mut o = encryption.to_string();
    if !extra.is_empty() {
        o = format!("{o},{extra}");
    }
    let size = size.to_string();
    let b;
    let mut args = vec!["-q", "-f", "qcow2", "-o", &o];
    if let Some(bp) = backing {
        b = bp.to_str().unwrap().to_string();
        args.extend(["-b", &b, "-F", "qcow2"]);
    }
    args.extend([path.to_str().unwrap(), &size]);
    ok(
        with_objects("qemu-img", &["create"], &[secret("k", pw)], &args),
        "qemu-img create",
    );
}

/// A chain made by qemu: `base` (encrypted as `encryption` says with "basepass", or not at
/// all) and `top` (with "toppass") over it, random writes in both, an internal snapshot of
/// `top` taken by qemu-img between two rounds of writes. Returns the objects and the spec of
/// `top`; [`chain_opener`] opens it in vimg.
pub fn qemu_chain(
    encryption: &str,
    dir: &Path,
    rng: &mut Rng,
    extra: &str,
    base_encrypted: bool,
) -> (Vec<String>, String) {
    let size = 1 << 20;
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let objects = vec![secret("kb", "basepass"), secret("kt", "toppass")];
    let base_spec = if base_encrypted {
        qemu_create_encrypted(encryption, &base, "basepass", size, extra, None);
        spec(&base, "kb", None)
    } else {
        common::qemu_create(&base, "qcow2", extra, None, size);
        format!("driver=qcow2,file.filename={}", base.display())
    };
    qemu_io(&objects, &base_spec, &random_io(rng, size, 12));
    qemu_create_encrypted(encryption, &top, "toppass", size, extra, Some(&base));
    let top_spec = spec(&top, "kt", base_encrypted.then_some("kb"));
    qemu_io(&objects, &top_spec, &random_io(rng, size, 10));
    ok(
        with_objects(
            "qemu-img",
            &["snapshot"],
            &objects,
            &["-c", "s1", "--image-opts", &top_spec],
        ),
        "qemu-img snapshot",
    );
    qemu_io(&objects, &top_spec, &random_io(rng, size, 10));
    (objects, top_spec)
}

/// The opener with the keys of a [`qemu_chain`] in `dir`.
pub fn chain_opener(dir: &Path, base_encrypted: bool) -> Opener {
    let top = dir.join("top.qcow2");
    let base = dir.join("base.qcow2");
    let mut images = vec![(top.as_path(), "kt")];
    if base_encrypted {
        images.push((base.as_path(), "kb"));
    }
    opener(&[("kb", "basepass"), ("kt", "toppass")], &images)
}
