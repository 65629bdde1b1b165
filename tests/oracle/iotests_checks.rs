//! Behaviours that qemu's iotests 036, 138, 261 and 271 check, compared with qemu-img on the
//! same input: each case is run once by qemu-img and once by vimg, on separate copies of an
//! image built by qemu-img and damaged by byte edits, and vimg must print what qemu-img prints
//! (its own name in place of `qemu-img:`), end with the same exit code and leave the same bytes.

use crate::common::header_fields;
use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common;
use common::poke;

use common::{qemu_available, qemu_io, run, run_in};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn rd(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

fn rd64(p: &Path, off: u64) -> u64 {
    u64::from_be_bytes(rd(p, off, 8).try_into().unwrap())
}

/// Runs `args` (with `{}` standing for the image name) on `q.qcow2` with qemu-img and on
/// `v.qcow2` with vimg, in `dir`; returns both (exit code, output), vimg's with its `vimg:`
/// prefix and image name replaced by qemu-img's.
fn both(dir: &Path, args: &[&str]) -> ((i32, String), (i32, String)) {
    let with = |name: &str| -> Vec<String> { args.iter().map(|a| a.replace("{}", name)).collect() };
    let qa = with("q.qcow2");
    let va = with("v.qcow2");
    let q = run_in(
        dir,
        "qemu-img",
        &qa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (vc, vo) = run_in(
        dir,
        VIMG,
        &va.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let vo = vo
        .replace("vimg:", "qemu-img:")
        .replace("v.qcow2", "q.qcow2");
    (q, (vc, vo))
}

/// Creates `q.qcow2` with qemu-img (options `opts`, size `size`), lets `damage` edit it, and
/// copies it to `v.qcow2`.
fn setup(dir: &Path, opts: &str, size: &str, damage: impl FnOnce(&Path)) {
    let q = dir.join("q.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            q.to_str().unwrap(),
            size,
        ],
    );
    damage(&q);
    std::fs::copy(&q, dir.join("v.qcow2")).unwrap();
}

/// iotest 036: `check -r all` opens the image read-write, and qemu's read-write open clears
/// the autoclear feature bits it does not know; vimg's repair must too.
#[test]
fn repair_clears_unknown_autoclear_bits() {
    if !qemu_available("repair_clears_unknown_autoclear_bits") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    setup(d.path(), "compat=1.1", "1M", |p| {
        poke(
            p,
            header_fields::AUTOCLEAR_FEATURES,
            &(1u64 << 63).to_be_bytes(),
        )
    });
    let (q, v) = both(d.path(), &["check", "-r", "all", "{}"]);
    assert_eq!(q, v);
    let qa = rd64(&d.path().join("q.qcow2"), 88);
    let va = rd64(&d.path().join("v.qcow2"), 88);
    assert_eq!(qa, 0, "qemu-img no longer clears the bit");
    assert_eq!(va, qa, "autoclear bits after check -r all");
}

/// iotest 138: `check -r all --output json` after fixing a leak and a corruption prints the
/// `-fixed` counters where qemu-img puts them among the other keys.
#[test]
fn repair_json_puts_fixed_counters_in_qemus_order() {
    if !qemu_available("repair_json_puts_fixed_counters_in_qemus_order") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    setup(d.path(), "compat=1.1", "64k", |p| {
        qemu_io(p, "qcow2", &["write 0 64k".to_string()]);
        let reftable = rd64(p, 48);
        let refblock = rd64(p, reftable);
        poke(p, refblock, &2u16.to_be_bytes());
        let l1 = rd64(p, 40);
        let e = rd64(p, l1) & !(1 << 63);
        poke(p, l1, &e.to_be_bytes());
    });
    let (q, v) = both(d.path(), &["check", "-r", "all", "--output", "json", "{}"]);
    assert!(q.1.contains("\"leaks-fixed\": 1"), "{}", q.1);
    assert_eq!(q, v);
}

/// iotests 061 and 271: amending a creation-only option is refused with qemu-img's two lines.
#[test]
fn amend_refuses_creation_only_options_in_qemus_words() {
    if !qemu_available("amend_refuses_creation_only_options_in_qemus_words") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for opt in ["extended_l2=on", "cluster_size=4k"] {
        setup(d.path(), "compat=1.1", "1M", |_| {});
        let (q, v) = both(d.path(), &["amend", "-o", opt, "{}"]);
        assert_ne!(q.0, 0);
        assert_eq!(q, v, "{opt}");
    }
}

/// iotest 261: a snapshot entry with more extra data than qemu accepts, or a header counting
/// more snapshots than qemu allows: `info` refuses to open the image, and a plain `check`
/// gives up (`Check failed: File too large`), in qemu-img's words and with its exit code.
#[test]
fn snapshot_tables_over_qemus_limits_refused_as_qemu_does() {
    if !qemu_available("snapshot_tables_over_qemus_limits_refused_as_qemu_does") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let extra = |p: &Path| {
        run("qemu-img", &["snapshot", "-c", "sn1", p.to_str().unwrap()]);
        let table = rd64(p, 64);
        poke(p, table + 36, &65536u32.to_be_bytes());
        let f = FsOpen::new().write(true).open(p).unwrap();
        f.set_len(f.metadata().unwrap().len() + 200_000).unwrap();
    };
    let too_many = |p: &Path| poke(p, header_fields::NB_SNAPSHOTS, &131_072u32.to_be_bytes());
    type Damage<'a> = &'a dyn Fn(&Path);
    let damages: [(&str, Damage); 2] = [("extra data", &extra), ("count", &too_many)];
    for (what, damage) in damages {
        for args in [
            &["info", "{}"][..],
            &["check", "{}"][..],
            &["check", "--output", "json", "{}"][..],
        ] {
            setup(d.path(), "compat=1.1", "64M", damage);
            let (q, v) = both(d.path(), args);
            assert_eq!(q.0, 1, "{what} {args:?}: {}", q.1);
            assert_eq!(q, v, "{what} {args:?}");
        }
    }
}

/// Builds the chain base <- mid <- top (1 MiB clusters, extended L2 entries, `size`) in `dir`
/// with the given prefix, writes `mid_writes` (qemu-io commands) into mid and `base_writes`
/// into base.
fn subcluster_chain(
    dir: &Path,
    prefix: &str,
    size: &str,
    base_writes: &[&str],
    mid_writes: &[&str],
) {
    let p = |n: &str| dir.join(format!("{prefix}.{n}"));
    let o = "cluster_size=1M,extended_l2=on";
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            o,
            p("base").to_str().unwrap(),
            size,
        ],
    );
    for (n, b) in [("mid", "base"), ("top", "mid")] {
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                o,
                "-b",
                p(b).to_str().unwrap(),
                "-F",
                "qcow2",
                p(n).to_str().unwrap(),
                size,
            ],
        );
    }
    let cmds = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    qemu_io(&p("base"), "qcow2", &cmds(base_writes));
    qemu_io(&p("mid"), "qcow2", &cmds(mid_writes));
}

/// iotest 271: safe-mode rebase of an image with subclusters writes only the subclusters that
/// differ (qemu-img 10 writes through the subcluster granularity), and with `-c` allocates as
/// qemu does (L2 table before the compressed data): the same map and L2 entries as qemu-img's.
#[test]
fn rebase_with_subclusters_writes_what_qemu_writes() {
    if !qemu_available("rebase_with_subclusters_writes_what_qemu_writes") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str], &'a str);
    let cases: [Case; 2] = [
        (
            &[],
            &["write -P 0x11 32k 32k", "write -P 0x22 960k 32k"],
            &[],
            "1M",
        ),
        (
            &["write -P 0x11 1M 1M"],
            &["write -P 0x22 992k 32k", "write -P 0x33 2048k 32k"],
            &["-c"],
            "3M",
        ),
    ];
    for (base, mid, extra, size) in cases {
        let mut maps = Vec::new();
        let mut l2s = Vec::new();
        for (tool, prefix) in [("qemu-img", "q"), (VIMG, "v")] {
            subcluster_chain(d.path(), prefix, size, base, mid);
            let top = format!("{prefix}.top");
            let base_name = format!("{prefix}.base");
            let mut args = vec!["rebase"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["-b", &base_name, "-F", "qcow2", &top]);
            let (code, out) = run_in(d.path(), tool, &args);
            assert_eq!(code, 0, "{tool} {args:?}: {out}");
            let (_, map) = run_in(d.path(), "qemu-img", &["map", "--output", "json", &top]);
            maps.push(map.replace(&top, "top"));
            let p = d.path().join(&top);
            let l1 = rd64(&p, 40);
            let l2 = rd64(&p, l1) & 0x00ff_ffff_ffff_fe00;
            l2s.push(rd(&p, l2, 48));
            let (c, out) = run_in(d.path(), "qemu-img", &["check", &top]);
            assert_eq!(c, 0, "{tool}: {out}");
        }
        assert_eq!(maps[0], maps[1], "rebase {extra:?}: map");
        assert_eq!(l2s[0], l2s[1], "rebase {extra:?}: L2 entries");
    }
}
