//! qemu-img's command line as scripts use it, with qemu-img 10 as the oracle: image names as
//! `json:{...}` and `--image-opts` option lists, `--object secret`, `dd`, `convert --salvage`,
//! `-C`, `-T`, `-r`, `-c -S 0`, `-n -o`, `bitmap --granularity` and `-o extent_size_hint`.

use crate::common;
use crate::common::header_fields;

use common::{qemu_available, qemu_create, qemu_io, run, run_status};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The text after the program's `name: ` prefix on each line (so that vimg's and qemu-img's
/// messages can be compared).
fn unprefixed(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            l.strip_prefix("vimg: ")
                .or_else(|| l.strip_prefix("qemu-img: "))
                .unwrap_or(l)
                .to_string()
        })
        .collect()
}

/// A qcow2 image with data, a zero-written range, and an explicitly zeroed range.
fn sample(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("s.qcow2");
    qemu_create(&img, "qcow2", "", None, 16 << 20);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 1 0 1M".into(),
            "write -z 2M 1M".into(),
            "write -P 0 4M 1M".into(),
            "write -P 2 8M 64k".into(),
        ],
    );
    img
}

#[test]
fn json_and_image_opts_names_open_the_named_image() {
    if !qemu_available("json_and_image_opts_names_open_the_named_image") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    let name = p(&img);
    let json =
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{name}"}}}}"#);
    let opts = format!("driver=qcow2,file.filename={name},file.locking=off");
    let plain_info = run(VIMG, &["info", "--output=json", name]);
    // qemu's JSON parser takes single-quoted strings too (its iotests use them).
    let quoted = format!("json:{{'driver': 'qcow2', 'file': {{'filename': '{name}'}}}}");
    assert_eq!(run(VIMG, &["info", "--output=json", &quoted]), plain_info);
    assert_eq!(run(VIMG, &["info", "--output=json", &json]), plain_info);
    assert_eq!(
        run(VIMG, &["info", "--image-opts", "--output=json", &opts]),
        plain_info
    );
    // qemu-img agrees that these names mean the same image.
    let q = run("qemu-img", &["map", "--output=json", &json]);
    assert_eq!(run(VIMG, &["map", "--output=json", &json]), q);
    assert_eq!(
        run(VIMG, &["map", "--image-opts", "--output=json", &opts]),
        q
    );
    run(VIMG, &["check", &json]);
    run(VIMG, &["check", "--image-opts", &opts]);
    let (code, out) = run_status(VIMG, &["compare", &json, name]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run_status(VIMG, &["compare", "--image-opts", &opts, &opts]);
    assert_eq!(code, 0, "{out}");
    run(VIMG, &["snapshot", "-l", &json]);
    run(VIMG, &["measure", "-O", "qcow2", &json]);
    run(
        VIMG,
        &[
            "bitmap",
            "--add",
            "--image-opts",
            &format!("driver=qcow2,file.filename={name}"),
            "b0",
        ],
    );
    run(VIMG, &["amend", "-o", "lazy_refcounts=on", &json]);
    let out = dir.path().join("out.raw");
    run(VIMG, &["convert", "-O", "raw", &json, p(&out)]);
    let (code, msg) = run_status("qemu-img", &["compare", name, p(&out)]);
    assert_eq!(code, 0, "{msg}");
    let raw = format!(r#"json:{{"driver":"file","filename":"{name}"}}"#);
    assert!(run(VIMG, &["info", &raw]).contains("file format: raw"));
    let fileproto = format!("file:{name}");
    assert!(run(VIMG, &["info", &fileproto]).contains("file format: qcow2"));
    // Refusals: one line, exit 1, as qemu-img's exit code.
    for (args, words) in [
        (
            vec!["info", "--image-opts", "-f", "qcow2", opts.as_str()],
            "mutually exclusive",
        ),
        (
            vec!["info", r#"json:{"driver":"qed","file":{"filename":"x"}}"#],
            "qed",
        ),
        (
            vec![
                "info",
                r#"json:{"driver":"qcow2","file":{"driver":"ssh","host":"h"}}"#,
            ],
            "ssh",
        ),
        (vec!["info", "json:{"], "JSON"),
        (
            vec![
                "create",
                "--image-opts",
                "-f",
                "raw",
                "driver=raw,file.filename=n",
                "1M",
            ],
            "image-opts",
        ),
    ] {
        let (code, out) = run_status(VIMG, &args);
        assert_eq!((code, out.lines().count()), (1, 1), "{args:?}: {out}");
        assert!(out.contains(words), "{args:?}: {out}");
    }
}

#[test]
fn object_secrets_are_parsed_on_every_command() {
    if !qemu_available("object_secrets_are_parsed_on_every_command") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "s3cret").unwrap();
    let good = [
        "secret,id=sec0,data=abc".to_string(),
        "secret,id=sec0,data=YWJj,format=base64".to_string(),
        format!("secret,id=sec0,file={}", p(&secret_file)),
    ];
    for obj in &good {
        for cmd in [&["info"][..], &["check"], &["map"], &["snapshot", "-l"]] {
            let mut args = cmd.to_vec();
            args.extend(["--object", obj, p(&img)]);
            run(VIMG, &args);
            run("qemu-img", &args);
        }
    }
    for bad in [
        "secret,data=abc",
        "secret,id=sec0",
        "secret,id=sec0,data=a,file=b",
        "secret,id=sec0,data=a,format=hex",
        "secret,id=sec0,data=a,bogus=1",
        "bogus,id=sec0",
    ] {
        let (qcode, _) = run_status("qemu-img", &["info", "--object", bad, p(&img)]);
        let (code, out) = run_status(VIMG, &["info", "--object", bad, p(&img)]);
        assert_eq!((code, out.lines().count()), (qcode, 1), "{bad}: {out}");
    }
}

/// Operands of `dd` tried against qemu-img dd.
const DD_CASES: &[&str] = &[
    "bs=64k count=20 skip=2",
    "bs=1000 count=7",
    "bs=4k skip=100000",
    "bs=3 count=5 skip=1",
    "",
    "bs=1M skip=12",
    "count=100 skip=4000",
];

#[test]
fn dd_output_equals_qemu_img_dd() {
    if !qemu_available("dd_output_equals_qemu_img_dd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    for case in DD_CASES {
        for fmt in ["raw", "qcow2"] {
            let ours = dir.path().join(format!("v.{fmt}"));
            let theirs = dir.path().join(format!("q.{fmt}"));
            let _ = std::fs::remove_file(&ours);
            let _ = std::fs::remove_file(&theirs);
            let ifarg = format!("if={}", p(&img));
            let (oarg, qarg) = (format!("of={}", p(&ours)), format!("of={}", p(&theirs)));
            let mut a: Vec<&str> = vec!["dd", "-O", fmt, &ifarg, &oarg];
            a.extend(case.split_whitespace());
            let mut b: Vec<&str> = vec!["dd", "-O", fmt, &ifarg, &qarg];
            b.extend(case.split_whitespace());
            let (c1, o1) = run_status(VIMG, &a);
            let (c2, o2) = run_status("qemu-img", &b);
            assert_eq!(c1, c2, "{case} {fmt}: {o1} / {o2}");
            assert_eq!(unprefixed(&o1), unprefixed(&o2), "{case} {fmt}");
            if fmt == "raw" {
                assert_eq!(
                    std::fs::read(&ours).unwrap(),
                    std::fs::read(&theirs).unwrap(),
                    "{case}"
                );
            } else {
                let (c, m) = run_status("qemu-img", &["compare", "-s", p(&ours), p(&theirs)]);
                assert_eq!(c, 0, "{case}: {m}");
                assert_eq!(
                    run("qemu-img", &["map", "--output=json", p(&ours)]),
                    run("qemu-img", &["map", "--output=json", p(&theirs)]),
                    "{case}"
                );
                run("qemu-img", &["check", p(&ours)]);
            }
        }
    }
    for bad in [
        &["dd", "if=a"][..],
        &["dd", "if=a", "of=b", "bs=0"],
        &["dd", "x"],
    ] {
        let (c1, o1) = run_status(VIMG, bad);
        let (c2, o2) = run_status("qemu-img", bad);
        assert_eq!(c1, c2, "{bad:?}");
        assert_eq!(unprefixed(&o1), unprefixed(&o2), "{bad:?}");
    }
}

/// A qcow2 image whose first compressed cluster (guest 64k) does not inflate.
fn corrupt_compressed(dir: &Path) -> std::path::PathBuf {
    let plain = dir.join("plain.qcow2");
    qemu_create(&plain, "qcow2", "", None, 1 << 20);
    qemu_io(
        &plain,
        "qcow2",
        &[
            "write -P 0x5a 64k 64k".into(),
            "write -P 0x33 256k 64k".into(),
        ],
    );
    let img = dir.join("corrupt.qcow2");
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", p(&plain), p(&img)],
    );
    // The L2 entry of guest cluster 1 holds the compressed data's host offset.
    let data = std::fs::read(&img).unwrap();
    let be = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(l2 + 8);
    assert_ne!(entry & (1 << 62), 0, "cluster 1 is not compressed");
    let host = entry & ((1 << 54) - 1);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0xff; 16], host).unwrap();
    img
}

#[test]
fn salvage_turns_unreadable_ranges_into_zeros_as_qemu_img() {
    if !qemu_available("salvage_turns_unreadable_ranges_into_zeros_as_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = corrupt_compressed(dir.path());
    let (ours, theirs) = (dir.path().join("v.raw"), dir.path().join("q.raw"));
    let (c1, o1) = run_status(
        VIMG,
        &["convert", "--salvage", "-O", "raw", p(&img), p(&ours)],
    );
    let (c2, o2) = run_status(
        "qemu-img",
        &["convert", "--salvage", "-O", "raw", p(&img), p(&theirs)],
    );
    assert_eq!((c1, c2), (0, 0), "{o1}\n{o2}");
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
    let (w1, w2) = (unprefixed(&o1), unprefixed(&o2));
    assert_eq!(w1.len(), w2.len());
    for (a, b) in w1.iter().zip(&w2) {
        assert!(a.starts_with(b.as_str()), "{a} / {b}");
    }
    // -q silences the warnings; without --salvage the read error fails the copy.
    let (c, o) = run_status(
        VIMG,
        &["convert", "-q", "--salvage", "-O", "raw", p(&img), p(&ours)],
    );
    assert_eq!((c, o.as_str()), (0, ""));
    let (c, _) = run_status(VIMG, &["convert", "-O", "raw", p(&img), p(&ours)]);
    assert_eq!(c, 1);
}

#[test]
fn copy_offload_and_source_cache_options() {
    if !qemu_available("copy_offload_and_source_cache_options") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    for fmt in ["raw", "qcow2"] {
        let ours = dir.path().join(format!("v.{fmt}"));
        let theirs = dir.path().join(format!("q.{fmt}"));
        let common = [
            "convert",
            "-C",
            "-T",
            "none",
            "-r",
            "1G",
            "-O",
            fmt,
            p(&img),
        ];
        let mut a = common.to_vec();
        a.push(p(&ours));
        let mut b = common.to_vec();
        b.push(p(&theirs));
        run(VIMG, &a);
        run("qemu-img", &b);
        let (c, m) = run_status("qemu-img", &["compare", "-s", p(&ours), p(&theirs)]);
        assert_eq!(c, 0, "{fmt}: {m}");
    }
    let out = p(&dir.path().join("x.qcow2")).to_string();
    for bad in [
        vec!["convert", "-C", "-c", "-O", "qcow2", p(&img), &out],
        vec!["convert", "-C", "-S", "4k", p(&img), &out],
        vec!["convert", "-C", "--salvage", p(&img), &out],
        vec!["convert", "-n", "-o", "cluster_size=4k", p(&img), &out],
        vec!["convert", "-T", "bogus", p(&img), &out],
        vec!["convert", "-r", "x", p(&img), &out],
    ] {
        let (c1, o1) = run_status(VIMG, &bad);
        let (c2, o2) = run_status("qemu-img", &bad);
        assert_eq!(c1, c2, "{bad:?}: {o1} / {o2}");
        if !bad.contains(&"-T") && !bad.contains(&"-r") {
            assert_eq!(unprefixed(&o1), unprefixed(&o2), "{bad:?}");
        }
    }
    for cmd in [
        &["check", "-T", "none"][..],
        &["compare", "-T", "none", "-p"],
    ] {
        let mut args = cmd.to_vec();
        args.push(p(&img));
        if cmd[0] == "compare" {
            args.push(p(&img));
        }
        run(VIMG, &args);
    }
}

/// A rate limit slows the copy down: 4 MiB of data at 8 MiB/s take at least a third of a
/// second (qemu-img's limit counts the data copied).
#[test]
fn convert_rate_limit_paces_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    std::fs::write(&src, vec![7u8; 4 << 20]).unwrap();
    let out = dir.path().join("o.raw");
    let t = std::time::Instant::now();
    run(
        VIMG,
        &["convert", "-r", "8M", "-f", "raw", p(&src), p(&out)],
    );
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(350),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(std::fs::read(&out).unwrap(), vec![7u8; 4 << 20]);
}

#[test]
fn compressed_convert_with_s0_allocates_like_qemu_img() {
    if !qemu_available("compressed_convert_with_s0_allocates_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    let (ours, theirs) = (dir.path().join("v.qcow2"), dir.path().join("q.qcow2"));
    let args = |out: &Path| {
        vec![
            "convert".to_string(),
            "-c".into(),
            "-S".into(),
            "0".into(),
            "-O".into(),
            "qcow2".into(),
            p(&img).into(),
            p(out).into(),
        ]
    };
    let a = args(&ours);
    let b = args(&theirs);
    run(VIMG, &a.iter().map(String::as_str).collect::<Vec<_>>());
    run(
        "qemu-img",
        &b.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        run("qemu-img", &["map", "--output=json", p(&ours)]),
        run("qemu-img", &["map", "--output=json", p(&theirs)])
    );
    let len = |f: &Path| std::fs::metadata(f).unwrap().len();
    assert_eq!(len(&ours), len(&theirs));
    run("qemu-img", &["check", p(&ours)]);
    let (c, m) = run_status("qemu-img", &["compare", p(&img), p(&ours)]);
    assert_eq!(c, 0, "{m}");
}

#[test]
fn bitmap_granularity_and_extent_size_hint_spellings() {
    if !qemu_available("bitmap_granularity_and_extent_size_hint_spellings") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    run(
        VIMG,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extent_size_hint=1M",
            p(&img),
            "1M",
        ],
    );
    run(
        VIMG,
        &["bitmap", "--add", "--granularity", "128k", p(&img), "b1"],
    );
    run(VIMG, &["bitmap", "--add", "-g", "256k", p(&img), "b2"]);
    let info = run("qemu-img", &["info", "--output=json", p(&img)]);
    assert!(info.contains("131072") && info.contains("262144"), "{info}");
    let raw = dir.path().join("r.raw");
    run(
        VIMG,
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "extent_size_hint=0",
            p(&raw),
            "1M",
        ],
    );
    run(
        VIMG,
        &[
            "convert",
            "-O",
            "raw",
            "-o",
            "extent_size_hint=64k",
            p(&img),
            p(&raw),
        ],
    );
    for fmt in ["raw", "qcow2"] {
        // An option of the file protocol, listed when the file is named.
        let help = run(VIMG, &["create", "-f", fmt, "-o", "help", "x.img"]);
        assert!(help.contains("extent_size_hint"), "{help}");
    }
    let (c, _) = run_status(
        VIMG,
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "extent_size_hint=8G",
            p(&raw),
            "1M",
        ],
    );
    assert_eq!(c, 1);
}

/// `check` of a raw image prints qemu-img's exact line (iotests 159 and 170 rely on it).
#[test]
fn raw_check_message_is_qemus() {
    if !qemu_available("raw_check_message_is_qemus") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let args = ["check", "-f", "raw", p(&raw)];
    let (c1, o1) = run_status(VIMG, &args);
    let (c2, o2) = run_status("qemu-img", &args);
    assert_eq!((c1, unprefixed(&o1)), (c2, unprefixed(&o2)));
}

/// `--salvage` over a range whose block status cannot be read (an unaligned L2 table offset):
/// the same output as qemu-img's, and its warnings (qemu prints the block-status one twice, in
/// its counting pass and its copy pass; vimg once).
#[test]
fn salvage_survives_unreadable_block_status() {
    if !qemu_available("salvage_survives_unreadable_block_status") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bs.qcow2");
    qemu_create(&img, "qcow2", "", None, 2 << 20);
    qemu_io(&img, "qcow2", &["write -P 7 0 64k".into()]);
    let data = std::fs::read(&img).unwrap();
    let l1 = common::header_u64(&data, header_fields::L1_TABLE_OFFSET);
    let at = l1 as usize;
    let e = u64::from_be_bytes(data[at..at + 8].try_into().unwrap());
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&(e | 0x200).to_be_bytes(), l1).unwrap();
    let (ours, theirs) = (dir.path().join("v.raw"), dir.path().join("q.raw"));
    let (c1, o1) = run_status(
        VIMG,
        &["convert", "--salvage", "-O", "raw", p(&img), p(&ours)],
    );
    let (c2, o2) = run_status(
        "qemu-img",
        &["convert", "--salvage", "-O", "raw", p(&img), p(&theirs)],
    );
    assert_eq!((c1, c2), (0, 0), "{o1}\n{o2}");
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
    let kinds = |o: &str| {
        let mut k: Vec<String> = unprefixed(o)
            .iter()
            .filter(|l| l.starts_with("warning: "))
            .map(|l| l.split(" offset ").next().unwrap().to_string())
            .collect();
        k.sort();
        k.dedup();
        k
    };
    assert_eq!(kinds(&o1), kinds(&o2));
    assert_eq!(kinds(&o1).len(), 2, "{o1}");
}

/// Snapshots of a format without them: qemu-img lists nothing and succeeds, and refuses the
/// other operations with its block layer's words, which vimg's message starts with.
#[test]
fn snapshots_of_a_raw_image_as_qemu_img() {
    if !qemu_available("snapshots_of_a_raw_image_as_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r.raw");
    std::fs::write(&r, vec![0u8; 1 << 20]).unwrap();
    let out = |prog: &str, args: &[&str]| {
        let o = std::process::Command::new(prog)
            .args(args)
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        (o.status.code(), text)
    };
    let (qc, qt) = out("qemu-img", &["snapshot", "-l", "-f", "raw", p(&r)]);
    let (vc, vt) = out(VIMG, &["snapshot", "-l", "-f", "raw", p(&r)]);
    assert_eq!((vc, vt.as_str()), (qc, qt.as_str()), "list");
    for (op, words) in [
        (
            "-c",
            "Could not create snapshot 's': Operation not supported",
        ),
        (
            "-a",
            "Could not apply snapshot 's': Block driver does not support snapshots",
        ),
    ] {
        let (qc, qt) = out("qemu-img", &["snapshot", op, "s", "-f", "raw", p(&r)]);
        let (vc, vt) = out(VIMG, &["snapshot", op, "s", "-f", "raw", p(&r)]);
        assert_eq!(vc, qc, "{op}: {vt}");
        assert!(qt.contains(words), "qemu-img {op}: {qt}");
        assert!(vt.contains(words), "vimg {op}: {vt}");
    }
    // A file name for qemu's null driver is refused by a command that does not read it as a
    // source, naming the driver, not taken for a missing file.
    let (vc, vt) = out(VIMG, &["info", "null-co://"]);
    assert_eq!(vc, Some(1));
    assert!(
        vt.contains("null driver") && !vt.contains("No such file"),
        "{vt}"
    );
}
