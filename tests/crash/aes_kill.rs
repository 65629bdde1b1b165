//! Crash tests of encrypted writes (qcow2 with legacy AES, and with LUKS, whose IVs follow the
//! host offset), as tests/crash/kill.rs does for plain images: vimg kills itself with SIGKILL just before its N-th change to a file
//! (`VIMG_TEST_KILL_AFTER_WRITES=N`, see `vimg::storage`), for N from 1 until the command
//! finishes, in `convert -n` into an encrypted image, `commit` of an encrypted overlay into an
//! encrypted base (another key) and `rebase -b ""` of an encrypted overlay (its backing data
//! copied into it). After each kill, qemu with the secrets finds no corruption in any image
//! (leaks allowed; a dirty image must be one `check -r all` repairs), and every 64 KiB block of
//! every image reads as before the command or as after it: never as ciphertext decrypted with
//! the wrong IV or key, nor as plaintext read as ciphertext.

use crate::common::{self, qemu_available};
use std::path::Path;
use std::process::Command;

const BLOCK: usize = 65536;
const MAX_POINTS: usize = 60;

/// The secrets every scenario's images use: `kb` for the base, `kt` for the top.
fn objects() -> Vec<String> {
    vec![
        "secret,id=kb,data=base passphrase".into(),
        "secret,id=kt,data=top passphrase".into(),
    ]
}

fn with_objects(prog: &str, sub: &str, args: &[String], env: Option<usize>) -> (bool, i32, String) {
    let mut cmd = Command::new(prog);
    cmd.arg(sub);
    for o in objects() {
        cmd.args(["--object", &o]);
    }
    cmd.args(args);
    if let Some(n) = env {
        cmd.env("VIMG_TEST_KILL_AFTER_WRITES", n.to_string());
    }
    let out = cmd.output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    (
        out.status.signal() == Some(9),
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `--image-opts` of an image of the scenario (`base`, `top` or `raw`) in `dir`.
fn spec(dir: &Path, name: &str) -> String {
    let p = dir.join(format!("{name}.img"));
    match name {
        "base" => format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=kb",
            p.display()
        ),
        // qemu refuses options for a backing file the image does not have (after rebase -b "").
        "top" if !has_backing(&p) => format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=kt",
            p.display()
        ),
        "top" => format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=kt,backing.encrypt.key-secret=kb",
            p.display()
        ),
        _ => format!("driver=raw,file.filename={}", p.display()),
    }
}

/// Whether the qcow2 image at `p` names a backing file (header bytes 8..16).
fn has_backing(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.len() >= 16 && b[8..16] != [0u8; 8])
}

fn qemu_io(dir: &Path, name: &str, cmds: &[&str]) {
    let mut args = vec!["--image-opts".to_string()];
    for c in cmds {
        args.extend(["-c".to_string(), c.to_string()]);
    }
    args.push(spec(dir, name));
    let mut full = Vec::new();
    for o in objects() {
        full.extend(["--object".to_string(), o]);
    }
    full.extend(args);
    let a: Vec<&str> = full.iter().map(String::as_str).collect();
    common::run("qemu-io", &a);
}

fn qemu_img(sub: &str, args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (_, code, out) = with_objects("qemu-img", sub, &args, None);
    (code, out)
}

/// The `-o` options of an image encrypted with `format` (`aes` or `luks`) under the secret `id`.
fn encrypt_options(format: &str, id: &str) -> String {
    let fast = if format == "luks" {
        ",encrypt.iter-time=10"
    } else {
        ""
    };
    format!("encrypt.format={format},encrypt.key-secret={id}{fast}")
}

/// base.img (encrypted with `format`, key kb) with data, zeros and a hole; top.img (key kt) over it with
/// other data; raw.img, plain data without a zero 4 KiB piece (convert would write such a
/// piece as zeros apart from the data around it, so that a 64 KiB block could be torn between
/// the two requests, encrypted or not).
fn setup(dir: &Path, format: &str) {
    let size = (4 << 20).to_string();
    let b = dir.join("base.img");
    let t = dir.join("top.img");
    let (c, o) = qemu_img(
        "create",
        &[
            "-q",
            "-f",
            "qcow2",
            "-o",
            &encrypt_options(format, "kb"),
            b.to_str().unwrap(),
            &size,
        ],
    );
    assert_eq!(c, 0, "{o}");
    qemu_io(
        dir,
        "base",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 1536k 64k",
            "write -z 2M 64k",
            "write -P 0x44 3M 1M",
        ],
    );
    let (c, o) = qemu_img(
        "create",
        &[
            "-q",
            "-f",
            "qcow2",
            "-o",
            &encrypt_options(format, "kt"),
            "-b",
            "base.img",
            "-F",
            "qcow2",
            t.to_str().unwrap(),
            &size,
        ],
    );
    assert_eq!(c, 0, "{o}");
    qemu_io(
        dir,
        "top",
        &[
            "write -P 0x99 100k 300k",
            "write -z 3584k 64k",
            "write -P 0x98 2M 1000",
        ],
    );
    let raw: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i / 4096 * 7 % 251 + 1) as u8)
        .collect();
    std::fs::write(dir.join("raw.img"), raw).unwrap();
}

/// The guest data of each image as qemu reads it (with the keys).
fn views(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["base", "top"]
        .iter()
        .map(|n| {
            let out = dir.join("view.raw");
            let (c, o) = qemu_img(
                "convert",
                &[
                    "--image-opts",
                    &spec(dir, n),
                    "-O",
                    "raw",
                    out.to_str().unwrap(),
                ],
            );
            assert_eq!(c, 0, "{n}: {o}");
            let v = std::fs::read(&out).unwrap();
            std::fs::remove_file(&out).unwrap();
            (n.to_string(), v)
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn is_dirty(img: &Path) -> bool {
    let field = common::header_fields::INCOMPATIBLE_FEATURES;
    std::fs::read(img)
        .is_ok_and(|b| b.len() >= (field + 8) as usize && common::header_u64(&b, field) & 1 != 0)
}

/// What is wrong with the images in `dir` after a kill.
fn verify(
    what: &str,
    dir: &Path,
    before: &[(String, Vec<u8>)],
    after: &[(String, Vec<u8>)],
) -> Vec<String> {
    let mut bad = Vec::new();
    for n in ["base", "top"] {
        let img = dir.join(format!("{n}.img"));
        let (code, out) = if is_dirty(&img) {
            qemu_img("check", &["-r", "all", "--image-opts", &spec(dir, n)])
        } else {
            qemu_img("check", &["--image-opts", &spec(dir, n)])
        };
        if code != 0 && code != 3 {
            bad.push(format!("{what}: qemu-img check {n} exits {code}: {out}"));
        }
    }
    if !bad.is_empty() {
        return bad;
    }
    for ((n, now), ((_, b), (_, a))) in views(dir).iter().zip(before.iter().zip(after)) {
        for (i, block) in now.chunks(BLOCK).enumerate() {
            let r = i * BLOCK..(i * BLOCK + block.len());
            if block != &b[r.clone()] && block != &a[r] {
                bad.push(format!(
                    "{what}: {n}: guest block at {:#x} reads neither as before nor as after",
                    i * BLOCK
                ));
                break;
            }
        }
    }
    bad
}

#[test]
fn killed_at_every_aes_write_images_stay_consistent() {
    if qemu_available("aes_kill") {
        killed_at_every_write("aes");
    }
}

#[test]
fn killed_at_every_luks_write_images_stay_consistent() {
    if qemu_available("luks_qcow2_kill") {
        killed_at_every_write("luks");
    }
}

/// Kills each scenario at each of its writes into images encrypted with `format`.
fn killed_at_every_write(format: &str) {
    let vimg = env!("CARGO_BIN_EXE_vimg");
    type Args = fn(&Path) -> (&'static str, Vec<String>);
    let scenarios: [(&str, Args); 3] = [
        ("convert -n", |d| {
            (
                "convert",
                vec![
                    "-n".into(),
                    "--image-opts".into(),
                    spec(d, "raw"),
                    "--target-image-opts".into(),
                    spec(d, "base"),
                ],
            )
        }),
        ("commit", |d| {
            ("commit", vec!["--image-opts".into(), spec(d, "top")])
        }),
        ("rebase", |d| {
            (
                "rebase",
                vec![
                    "-b".into(),
                    "".into(),
                    "--image-opts".into(),
                    spec(d, "top"),
                ],
            )
        }),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let origin = tmp.path().join("origin");
    std::fs::create_dir_all(&origin).unwrap();
    setup(&origin, format);
    let before = views(&origin);
    let mut failures = Vec::new();
    for (name, args) in scenarios {
        let done = tmp.path().join(format!("{}-done", name.replace(' ', "_")));
        copy_dir(&origin, &done);
        let (sub, a) = args(&done);
        let (killed, code, out) = with_objects(vimg, sub, &a, None);
        assert!(!killed && code == 0, "{name}: {out}");
        let after = views(&done);
        let files = |d: &Path| ["base.img", "top.img"].map(|f| std::fs::read(d.join(f)).unwrap());
        assert!(files(&done) != files(&origin), "{name} changed nothing");
        // A command with more writes than MAX_POINTS is tested at its first ones only.
        let mut kills = 0;
        for n in 1..=MAX_POINTS {
            let dir = tmp.path().join(format!("{}-{n}", name.replace(' ', "_")));
            copy_dir(&origin, &dir);
            let (sub, a) = args(&dir);
            let (killed, code, out) = with_objects(vimg, sub, &a, Some(n));
            if !killed {
                assert_eq!(code, 0, "{name} at {n}: {out}");
                break;
            }
            kills += 1;
            failures.extend(verify(
                &format!("{name} killed at write {n}"),
                &dir,
                &before,
                &after,
            ));
            std::fs::remove_dir_all(&dir).unwrap();
        }
        eprintln!("{name}: killed at {kills} points");
        assert!(
            kills >= 3,
            "{name}: the kill hook stopped it only {kills} times"
        );
    }
    common::assert_no_failures(&failures);
}
