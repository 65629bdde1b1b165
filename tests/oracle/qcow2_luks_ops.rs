//! The image commands on LUKS-encrypted qcow2 images (`crypt_method` 2), vimg against qemu-img
//! on twin copies of images qemu made and wrote: `resize`, `snapshot`, `commit`, `rebase`,
//! `check -r all`, `map`, `compare` and `convert`. Chains have a LUKS overlay over a LUKS base
//! with another passphrase, or over a plain base. After each command both copies must read the
//! same through qemu (a cluster that moves must be encrypted again for its new host offset,
//! since a LUKS sector's IV is its host offset) and pass `qemu-img check`; where qemu-img
//! refuses, vimg must refuse with the same message and exit code.

use crate::common::encrypted::{ok, qemu_io, random_io, secret};
use crate::common::{self, Rng};
use std::path::{Path, PathBuf};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
const SIZE: u64 = 4 << 20;

/// The secrets of every image of the fixture.
fn objects() -> Vec<String> {
    vec![
        secret("kb", "basepass"),
        secret("kt", "toppass"),
        secret("kn", "newpass"),
    ]
}

/// `--image-opts` of `name` (relative to the working directory) with `opts` appended.
fn opts(name: &str, extra: &str) -> String {
    let mut s = format!("driver=qcow2,file.filename={name}");
    if !extra.is_empty() {
        s.push(',');
        s.push_str(extra);
    }
    s
}

/// The LUKS overlay over the LUKS base, both keys given.
fn top() -> String {
    opts(
        "top.qcow2",
        "encrypt.key-secret=kt,backing.encrypt.key-secret=kb",
    )
}
/// The LUKS base.
fn base() -> String {
    opts("base.qcow2", "encrypt.key-secret=kb")
}
/// The LUKS overlay over the plain base.
fn ptop() -> String {
    opts("ptop.qcow2", "encrypt.key-secret=kt")
}

/// Runs `prog SUB --object... ARGS` in `dir`.
fn run_in(dir: &Path, prog: &str, sub: &str, args: &[&str]) -> (i32, String) {
    let mut a = vec![sub.to_string()];
    for o in objects() {
        a.push("--object".into());
        a.push(o);
    }
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    common::run_in(dir, prog, &a)
}

fn qemu_create_luks(dir: &Path, name: &str, id: &str, extra: &str, backing: Option<&str>) {
    let o = format!("encrypt.format=luks,encrypt.key-secret={id},encrypt.iter-time=10{extra}");
    let size = SIZE.to_string();
    let mut args = vec!["-q", "-f", "qcow2", "-o", &o];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([name, &size]);
    ok(run_in(dir, "qemu-img", "create", &args), "qemu-img create");
}

/// qemu makes, in `dir`: `base.qcow2` (LUKS, "basepass"), `top.qcow2` over it (LUKS,
/// "toppass"), `plain.qcow2` (not encrypted), `ptop.qcow2` over it (LUKS, "toppass") and
/// `new.qcow2` (LUKS, "newpass"), each written at random places by qemu-io. Backing files are
/// named relatively, so that the directory can be copied.
fn fixture(dir: &Path, rng: &mut Rng, extra: &str) {
    let io = |spec: &str, rng: &mut Rng| {
        let spec = spec.replace(
            "file.filename=",
            &format!("file.filename={}/", dir.display()),
        );
        qemu_io(&objects(), &spec, &random_io(rng, SIZE, 10));
    };
    qemu_create_luks(dir, "base.qcow2", "kb", extra, None);
    io(&base(), rng);
    qemu_create_luks(dir, "top.qcow2", "kt", extra, Some("base.qcow2"));
    io(&top(), rng);
    let plain = dir.join("plain.qcow2");
    common::qemu_create(&plain, "qcow2", extra.trim_start_matches(','), None, SIZE);
    io(&opts("plain.qcow2", ""), rng);
    qemu_create_luks(dir, "ptop.qcow2", "kt", extra, Some("plain.qcow2"));
    io(&ptop(), rng);
    qemu_create_luks(dir, "new.qcow2", "kn", extra, None);
    io(&opts("new.qcow2", "encrypt.key-secret=kn"), rng);
}

/// Two copies of the fixture: qemu-img works on `q`, vimg on `v`.
struct Twins {
    _dir: tempfile::TempDir,
    q: PathBuf,
    v: PathBuf,
}

fn twins(fixture: &Path) -> Twins {
    let dir = tempfile::tempdir().unwrap();
    let (q, v) = (dir.path().join("q"), dir.path().join("v"));
    for d in [&q, &v] {
        std::fs::create_dir(d).unwrap();
        for e in std::fs::read_dir(fixture).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    Twins { _dir: dir, q, v }
}

impl Twins {
    /// Runs `SUB ARGS` with qemu-img in `q` and vimg in `v`; both must end the same way, with
    /// the same message when they fail. Returns qemu-img's output.
    fn both(&self, sub: &str, args: &[&str]) -> String {
        let q = run_in(&self.q, "qemu-img", sub, args);
        let v = run_in(&self.v, VIMG, sub, args);
        let first = |r: &(i32, String)| {
            r.1.lines()
                .find(|l| l.starts_with("qemu-img: ") || l.starts_with("vimg: "))
                .map(|l| unnamed(l.split_once(": ").unwrap().1))
        };
        assert_eq!(
            (v.0, first(&v)),
            (q.0, first(&q)),
            "{sub} {args:?}\nvimg: {}\nqemu-img: {}",
            v.1,
            q.1
        );
        q.1
    }

    /// The guest view of the image `spec` in each copy, as qemu reads it, is the same, and
    /// `qemu-img check` finds vimg's copy clean.
    fn same_view(&self, spec: &str, what: &str) {
        let q = view(&self.q, spec);
        let v = view(&self.v, spec);
        assert!(
            q.len() == v.len() && q == v,
            "{what}: {spec}: guest views differ"
        );
        check_clean(&self.v, spec, what);
    }
}

/// A message without the name of the image it is about, which vimg puts first
/// (`top.qcow2: ...`) and qemu-img does not, and which with `--image-opts` qemu-img gives as
/// the options (`Could not open 'driver=qcow2,...': ...`, `Did not find 'x' in the backing
/// chain of 'driver=qcow2,...'`) and vimg as the file name.
fn unnamed(m: &str) -> String {
    let m = m.split_once(".qcow2: ").map_or(m, |(_, m)| m);
    let m = m
        .split_once(" in the backing chain of '")
        .map_or(m, |(m, _)| m);
    match m.strip_prefix("Could not open '") {
        Some(rest) if rest.contains("': ") => {
            format!("Could not open '…': {}", rest.split_once("': ").unwrap().1)
        }
        _ => m.to_string(),
    }
}

/// What qemu reads from the image `spec` in `dir`.
fn view(dir: &Path, spec: &str) -> Vec<u8> {
    let out = dir.join("view.raw");
    let args = ["--image-opts", spec, "-O", "raw", "view.raw"];
    ok(
        run_in(dir, "qemu-img", "convert", &args),
        "qemu-img convert",
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn check_clean(dir: &Path, spec: &str, what: &str) {
    let (code, out) = run_in(dir, "qemu-img", "check", &["--image-opts", spec]);
    assert_eq!(code, 0, "{what}: qemu-img check {spec}: {out}");
}

/// The fixtures' qcow2 options: the default and a small cluster size with extended L2 entries.
const LAYOUTS: [&str; 2] = ["", ",cluster_size=16384,extended_l2=on"];

fn fixtures(seed: u64) -> Vec<(tempfile::TempDir, &'static str)> {
    let mut rng = Rng::seeded(seed);
    LAYOUTS
        .iter()
        .map(|extra| {
            let d = tempfile::tempdir().unwrap();
            fixture(d.path(), &mut rng, extra);
            (d, *extra)
        })
        .collect()
}

#[test]
fn resize_grows_and_shrinks_as_qemu() {
    if !common::qemu_available("luks_ops_resize") {
        return;
    }
    for (fx, layout) in fixtures(0x5e1) {
        for spec in [top(), ptop()] {
            for (args, what) in [
                (vec!["9M"], "grow"),
                (vec!["+1000k"], "grow unaligned"),
                (vec!["--shrink", "2M"], "shrink"),
                (vec!["--shrink", "1500k"], "shrink unaligned"),
                (vec!["--preallocation=metadata", "9M"], "metadata"),
                (
                    vec!["--preallocation=metadata", "+999k"],
                    "metadata unaligned",
                ),
                (vec!["--preallocation=falloc", "9M"], "falloc"),
                (vec!["--preallocation=full", "+999k"], "full"),
                (vec!["--preallocation=off", "--shrink", "1M"], "shrink off"),
                (
                    vec!["--preallocation=full", "--shrink", "1M"],
                    "shrink full",
                ),
            ] {
                let t = twins(fx.path());
                let mut a = args.clone();
                let tail = a.pop().unwrap();
                a.extend(["--image-opts", &spec, tail]);
                t.both("resize", &a);
                let what = format!("{layout} resize {what}");
                if what.ends_with("falloc") || what.ends_with("full") {
                    // The preallocated clusters hold zeros on disk, which read as their
                    // decryption at their host offsets. qemu first moves the refcount table
                    // to the old end of the file (qcow2_refcount_area), vimg does not, so the
                    // grown area's host offsets, and what it reads, differ (left to do).
                    // What was there before, the allocation and the checks agree.
                    let (q, v) = (view(&t.q, &spec), view(&t.v, &spec));
                    assert_eq!(q.len(), v.len(), "{what}");
                    assert!(q[..SIZE as usize] == v[..SIZE as usize], "{what}");
                    let m = ["--output=json", "--image-opts", &spec];
                    let qm = ok(run_in(&t.q, "qemu-img", "map", &m), "qemu-img map");
                    let vm = ok(run_in(&t.v, "qemu-img", "map", &m), "qemu-img map");
                    assert_eq!(vm, qm, "{what}");
                    check_clean(&t.v, &spec, &what);
                } else {
                    t.same_view(&spec, &what);
                }
                let other = if spec == top() {
                    base()
                } else {
                    opts("plain.qcow2", "")
                };
                t.same_view(&other, "the backing file is left alone");
            }
        }
    }
}

#[test]
fn snapshots_as_qemu() {
    if !common::qemu_available("luks_ops_snapshot") {
        return;
    }
    let mut rng = Rng::seeded(0x5a9);
    for (fx, layout) in fixtures(0x5a) {
        for spec in [top(), ptop()] {
            let t = twins(fx.path());
            let what = format!("{layout} {spec}");
            t.both("snapshot", &["-c", "s1", "--image-opts", &spec]);
            t.same_view(&spec, &what);
            // Writes after the snapshot copy the shared clusters to new host offsets.
            let writes = random_io(&mut rng, SIZE, 8);
            for d in [&t.q, &t.v] {
                let spec =
                    spec.replace("file.filename=", &format!("file.filename={}/", d.display()));
                qemu_io(&objects(), &spec, &writes);
            }
            t.both("snapshot", &["-c", "s2", "--image-opts", &spec]);
            for d in [&t.q, &t.v] {
                let out = run_in(
                    d,
                    "qemu-img",
                    "convert",
                    &["-l", "s1", "--image-opts", &spec, "-O", "raw", "s1.raw"],
                );
                ok(out, "qemu-img convert -l");
            }
            assert!(
                std::fs::read(t.q.join("s1.raw")).unwrap()
                    == std::fs::read(t.v.join("s1.raw")).unwrap(),
                "{what}: snapshot s1"
            );
            t.both("snapshot", &["-a", "s1", "--image-opts", &spec]);
            t.same_view(&spec, &format!("{what} -a s1"));
            t.both("snapshot", &["-d", "s1", "--image-opts", &spec]);
            t.same_view(&spec, &format!("{what} -d s1"));
            t.both("snapshot", &["-a", "s2", "--image-opts", &spec]);
            t.same_view(&spec, &format!("{what} -a s2"));
            t.both("snapshot", &["-d", "s2", "--image-opts", &spec]);
            t.same_view(&spec, &format!("{what} -d s2"));
            t.both("snapshot", &["-a", "nothere", "--image-opts", &spec]);
        }
    }
}

#[test]
fn commit_as_qemu() {
    if !common::qemu_available("luks_ops_commit") {
        return;
    }
    for (fx, layout) in fixtures(0xc0) {
        for (spec, under) in [(top(), base()), (ptop(), opts("plain.qcow2", ""))] {
            let json_base = r#"json:{"encrypt.key-secret": "kb", "driver": "qcow2", "file": {"driver": "file", "filename": "base.qcow2"}}"#;
            for args in [
                vec![],
                vec!["-d"],
                vec!["-b", "base.qcow2"],
                vec!["-b", json_base],
                vec!["-b", "plain.qcow2"],
                vec!["-p"],
            ] {
                let t = twins(fx.path());
                let mut a = args.clone();
                a.extend(["--image-opts", &spec]);
                t.both("commit", &a);
                let what = format!("{layout} commit {args:?} {spec}");
                t.same_view(&under, &what);
                t.same_view(&spec, &what);
            }
        }
    }
}

#[test]
fn rebase_as_qemu() {
    if !common::qemu_available("luks_ops_rebase") {
        return;
    }
    for (fx, layout) in fixtures(0x4eb) {
        let b = |name: &str| {
            vec![
                "-b".to_string(),
                name.to_string(),
                "-F".into(),
                "qcow2".into(),
            ]
        };
        let mut unsafe_mode = b("new.qcow2");
        unsafe_mode.insert(0, "-u".into());
        // `{D}` stands for the copy's directory.
        let cases: Vec<(Vec<String>, String)> = vec![
            // Safe mode onto another encrypted base (qemu gives no key to the new backing
            // file), onto a plain one by absolute and by relative name, and off any base.
            (b("{D}/new.qcow2"), top()),
            (b("{D}/plain.qcow2"), top()),
            (b("plain.qcow2"), top()),
            (b("plain.qcow2"), ptop()),
            (b("{D}/base.qcow2"), ptop()),
            (vec!["-b".into(), "".into()], top()),
            (vec!["-b".into(), "".into()], ptop()),
            // Unsafe mode: only the name changes.
            (unsafe_mode.clone(), ptop()),
            (
                unsafe_mode.clone(),
                opts("top.qcow2", "encrypt.key-secret=kt"),
            ),
            (unsafe_mode, top()),
        ];
        for (args, spec) in cases {
            let t = twins(fx.path());
            let mut res = vec![];
            for (dir, prog) in [(&t.q, "qemu-img"), (&t.v, VIMG)] {
                let d = dir.display().to_string();
                let mut a: Vec<String> = args.iter().map(|s| s.replace("{D}", &d)).collect();
                a.extend(["--image-opts".to_string(), spec.clone()]);
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                let (code, out) = run_in(dir, prog, "rebase", &a);
                let msg = out
                    .lines()
                    .find(|l| l.starts_with("qemu-img: ") || l.starts_with("vimg: "))
                    .map(|l| unnamed(l.split_once(": ").unwrap().1).replace(&d, "{D}"));
                res.push((code, msg));
            }
            let what = format!("{layout} rebase {args:?} {spec}");
            assert_eq!(res[1], res[0], "{what}");
            // The overlay read with what it now names as its backing file.
            let file = spec.split(',').nth(1).unwrap();
            let key = match args
                .iter()
                .position(|a| a == "-b")
                .map(|i| args[i + 1].as_str())
            {
                _ if res[0].0 != 0 => spec.clone(),
                Some(n) if n.ends_with("new.qcow2") => opts(
                    &file[14..],
                    "encrypt.key-secret=kt,backing.encrypt.key-secret=kn",
                ),
                Some(n) if n.ends_with("base.qcow2") => opts(
                    &file[14..],
                    "encrypt.key-secret=kt,backing.encrypt.key-secret=kb",
                ),
                _ => opts(&file[14..], "encrypt.key-secret=kt"),
            };
            t.same_view(&key, &what);
        }
    }
}

/// Sets the refcount of the first cluster past the end of the file `img` (16-bit refcounts,
/// its refcount block the first one) to 1 and extends the file over it: a leaked cluster.
fn leak_a_cluster(img: &Path) {
    let data = std::fs::read(img).unwrap();
    let h = |at: u64| common::header_u64(&data, at);
    let cluster_bits = common::header_u32(&data, common::header_fields::CLUSTER_BITS);
    assert_eq!(
        common::header_u32(&data, common::header_fields::REFCOUNT_ORDER),
        4
    );
    let cs = 1u64 << cluster_bits;
    let reftable = h(common::header_fields::REFCOUNT_TABLE_OFFSET);
    let block = common::header_u64(&data[reftable as usize..], 0);
    let n = (data.len() as u64).div_ceil(cs);
    assert!(
        n < cs / 2,
        "the leaked cluster is in the first refcount block"
    );
    common::poke(img, block + 2 * n, &1u16.to_be_bytes());
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.set_len((n + 1) * cs).unwrap();
}

#[test]
fn check_repairs_a_leak_as_qemu() {
    if !common::qemu_available("luks_ops_check") {
        return;
    }
    for (fx, layout) in fixtures(0xc4) {
        for (spec, file) in [(top(), "top.qcow2"), (ptop(), "ptop.qcow2")] {
            let t = twins(fx.path());
            let before = view(&t.q, &spec);
            for d in [&t.q, &t.v] {
                leak_a_cluster(&d.join(file));
            }
            let out = t.both("check", &["--image-opts", &spec]);
            assert!(out.contains("1 leaked clusters"), "{out}");
            let q = run_in(
                &t.q,
                "qemu-img",
                "check",
                &["-r", "all", "--image-opts", &spec],
            );
            let v = run_in(&t.v, VIMG, "check", &["-r", "all", "--image-opts", &spec]);
            assert_eq!(v, q, "{layout} check -r all {spec}");
            t.same_view(&spec, &format!("{layout} repaired"));
            assert!(
                view(&t.v, &spec) == before,
                "{layout} {spec}: repair changed the data"
            );
        }
    }
}

#[test]
fn map_compare_convert_as_qemu() {
    if !common::qemu_available("luks_ops_map") {
        return;
    }
    for (fx, layout) in fixtures(0x3a9) {
        let t = twins(fx.path());
        for spec in [top(), ptop(), base()] {
            for args in [
                vec!["--output=json"],
                vec![
                    "--output=json",
                    "--start-offset=100000",
                    "--max-length=2000000",
                ],
            ] {
                let mut a = args.clone();
                a.extend(["--image-opts", &spec]);
                let q = t.both("map", &a);
                let v = run_in(&t.v, VIMG, "map", &a);
                assert_eq!(v.1, q, "{layout} map {args:?} {spec}");
            }
            let q = t.both("convert", &["--image-opts", &spec, "-O", "raw", "out.raw"]);
            assert!(q.is_empty());
            assert!(
                std::fs::read(t.q.join("out.raw")).unwrap()
                    == std::fs::read(t.v.join("out.raw")).unwrap(),
                "{layout} convert {spec}"
            );
            // vimg's qcow2 copy compares equal with the image, in both tools.
            t.both(
                "convert",
                &["--image-opts", &spec, "-O", "qcow2", "out.qcow2"],
            );
            for sub in [vec![], vec!["-s"]] {
                let mut a = sub.clone();
                a.extend([
                    "--image-opts",
                    &spec,
                    "driver=qcow2,file.filename=out.qcow2",
                ]);
                let out = t.both("compare", &a);
                assert!(
                    !sub.is_empty() || out.contains("Images are identical."),
                    "{out}"
                );
            }
        }
        // `info` opens no backing file, so options for it are refused, as qemu-img does;
        // with the chain they are taken.
        for args in [vec![], vec!["--backing-chain"], vec!["--output=json"]] {
            for spec in [
                top(),
                ptop(),
                format!("{},backing.encrypt.key-secret=kb", base()),
            ] {
                let mut a = args.clone();
                a.extend(["--image-opts", &spec]);
                t.both("info", &a);
            }
        }
        // Images that differ: the first difference is the same, with and without -s.
        for sub in [vec![], vec!["-s"]] {
            let mut a = sub.clone();
            let new = opts("new.qcow2", "encrypt.key-secret=kn");
            let (x, y) = (top(), ptop());
            for (l, r) in [(&x, &base()), (&x, &y), (&y, &new)] {
                let mut a2 = a.clone();
                a2.extend(["--image-opts", l, r]);
                t.both("compare", &a2);
            }
            a.extend(["--image-opts", &x, "driver=raw,file.filename=out.raw"]);
            t.both("compare", &a);
        }
    }
}

#[test]
fn info_names_an_image_opened_with_strong_options_as_qemu() {
    if !common::qemu_available("luks_ops_info_name") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_create_luks(d, "i.qcow2", "kt", "", None);
    common::qemu_create(&d.join("p.qcow2"), "qcow2", "", None, SIZE);
    let abs = format!(
        "driver=qcow2,file.filename={}/i.qcow2,encrypt.key-secret=kt",
        d.display()
    );
    for spec in [
        "driver=qcow2,file.filename=p.qcow2",
        "driver=qcow2,file.filename=p.qcow2,file.locking=off,cache.no-flush=on,l2-cache-size=1M",
        "driver=qcow2,file.filename=i.qcow2,encrypt.key-secret=kt",
        "file.filename=i.qcow2,encrypt.key-secret=kt",
        "driver=qcow2,file.driver=file,file.filename=i.qcow2,encrypt.key-secret=kt,encrypt.format=luks",
        "driver=qcow2,file.filename=i.qcow2,encrypt.key-secret=kt,cache.direct=on,file.aio=threads",
        "driver=qcow2,file.filename=i.qcow2,encrypt.key-secret=kt,lazy-refcounts=on,discard=unmap",
        &abs,
    ] {
        for args in [vec![], vec!["--output=json"], vec!["--backing-chain"]] {
            let mut a = args.clone();
            a.extend(["--image-opts", spec]);
            let q = ok(run_in(d, "qemu-img", "info", &a), "qemu-img info");
            let v = ok(run_in(d, VIMG, "info", &a), "vimg info");
            assert_eq!(v, q, "info {args:?} {spec}");
        }
    }
}

#[test]
fn commands_without_the_key_as_qemu() {
    if !common::qemu_available("luks_ops_no_key") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path(), &mut Rng::seeded(0x9e7), "");
    let t = twins(dir.path());
    t.both("snapshot", &["-c", "s1", "--image-opts", &top()]);
    // The image named by its file: no key for either layer. Metadata-only commands work,
    // those that read or write guest data are refused, in qemu's words.
    for args in [
        vec!["snapshot", "-l", "top.qcow2"],
        vec!["snapshot", "-c", "s2", "top.qcow2"],
        vec!["snapshot", "-a", "s1", "top.qcow2"],
        vec!["snapshot", "-d", "s2", "top.qcow2"],
        vec!["check", "top.qcow2"],
        vec!["map", "--output=json", "top.qcow2"],
        vec!["convert", "-O", "raw", "top.qcow2", "o.raw"],
        vec!["compare", "top.qcow2", "base.qcow2"],
        vec!["commit", "top.qcow2"],
        vec!["rebase", "-b", "plain.qcow2", "-F", "qcow2", "top.qcow2"],
        vec![
            "rebase",
            "-u",
            "-b",
            "plain.qcow2",
            "-F",
            "qcow2",
            "ptop.qcow2",
        ],
        vec!["resize", "top.qcow2", "5M"],
        vec!["resize", "--shrink", "ptop.qcow2", "3M"],
    ] {
        t.both(args[0], &args[1..]);
    }
    t.same_view(&top(), "after the commands without the key");
    t.same_view(&ptop(), "ptop");
}
