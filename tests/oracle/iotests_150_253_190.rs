//! What qemu's iotests 150 (converting from the null driver; a raw target's first block),
//! 253 (mapping a raw file whose size is not a multiple of the host block size) and 190
//! (measuring an image with bitmaps) check, compared with qemu-img 10.0.2 on the same input.

use crate::common;

use common::{qemu_available, run, run_status};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img map --output=json` of `img` (format `fmt`), as qemu-img sees it.
fn qemu_map(img: &Path, fmt: &str) -> String {
    run("qemu-img", &["map", "--output=json", "-f", fmt, s(img)])
}

/// Null-driver sources, in each spelling qemu takes: vimg maps them as qemu-img does, and
/// converting from them (sparse and not, to raw and qcow2) gives the same target layout.
#[test]
fn null_driver_sources_map_and_convert_as_in_qemu() {
    if !qemu_available("null_driver_sources_map_and_convert_as_in_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        "null-co://",
        "null-aio://",
        "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }",
        r#"json:{"driver":"null-aio","size":"64k"}"#,
        r#"json:{"driver":"raw","file":{"driver":"null-co","size":1000,"read-zeroes":true}}"#,
    ];
    for spec in specs {
        let q = run_status("qemu-img", &["map", "--output=json", spec]);
        let v = run_status(VIMG, &["map", "--output=json", spec]);
        assert_eq!(v, q, "map {spec}");
    }
    let q = run_status(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--image-opts",
            "driver=null-co,size=4k",
        ],
    );
    let v = run_status(
        VIMG,
        &[
            "map",
            "--output=json",
            "--image-opts",
            "driver=null-co,size=4k",
        ],
    );
    assert_eq!(v, q);
    for bad in ["null-co://x", "json:{\"driver\":\"null-co\",\"bogus\":1}"] {
        let (code, msg) = run_status(VIMG, &["map", bad]);
        assert_eq!(code, 1, "{bad}: {msg}");
        assert_eq!(msg.lines().count(), 1, "{bad}: {msg}");
        assert_eq!(run_status("qemu-img", &["map", bad]).0, 1);
    }
    let src = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }";
    for fmt in ["raw", "qcow2"] {
        for sparse in ["512", "0"] {
            let q = dir.path().join(format!("q-{sparse}.{fmt}"));
            let v = dir.path().join(format!("v-{sparse}.{fmt}"));
            run(
                "qemu-img",
                &["convert", "-O", fmt, "-S", sparse, src, s(&q)],
            );
            run(VIMG, &["convert", "-O", fmt, "-S", sparse, src, s(&v)]);
            assert_eq!(
                qemu_map(&v, fmt),
                qemu_map(&q, fmt),
                "convert -O {fmt} -S {sparse}"
            );
            run("qemu-img", &["compare", "-f", fmt, "-F", fmt, s(&v), s(&q)]);
        }
    }
}

/// qemu writes the first block of a raw file it grows from empty (file-posix's
/// allocate_first_block): raw targets of convert and raw files resized from nothing map their
/// first 4 KiB (or all of a shorter file) as data, as qemu's do.
#[test]
fn raw_files_grown_from_empty_have_their_first_block_written() {
    if !qemu_available("raw_files_grown_from_empty_have_their_first_block_written") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero.raw");
    std::fs::File::create(&zero)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    for (tool, tag) in [("qemu-img", "q"), (VIMG, "v")] {
        let out = dir.path().join(format!("{tag}-conv.raw"));
        run(
            tool,
            &["convert", "-f", "raw", "-O", "raw", s(&zero), s(&out)],
        );
        let small = dir.path().join(format!("{tag}-small.raw"));
        run(tool, &["create", "-f", "raw", s(&small), "1000"]);
        let grown = dir.path().join(format!("{tag}-grown.raw"));
        std::fs::File::create(&grown).unwrap();
        run(tool, &["resize", "-f", "raw", s(&grown), "1M"]);
        let kept = dir.path().join(format!("{tag}-kept.raw"));
        std::fs::File::create(&kept).unwrap().set_len(8192).unwrap();
        run(tool, &["resize", "-f", "raw", s(&kept), "1M"]);
    }
    for name in ["conv", "small", "grown", "kept"] {
        let q = dir.path().join(format!("q-{name}.raw"));
        let v = dir.path().join(format!("v-{name}.raw"));
        assert_eq!(qemu_map(&v, "raw"), qemu_map(&q, "raw"), "{name}");
    }
}

/// A raw file whose end is not sector-aligned, mapped through `--image-opts` with
/// `cache.direct` on (qemu's block status then comes in whole sectors, so the partial sector at
/// the end of the file belongs to the data before it) and off (the bytes past the end are a
/// zero range of their own), as in iotest 253.
#[test]
fn unaligned_raw_end_maps_as_qemu_with_and_without_o_direct() {
    if !qemu_available("unaligned_raw_end_maps_as_qemu_with_and_without_o_direct") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.raw");
    let size = (1u64 << 20) - 1;
    run(
        "qemu-img",
        &["create", "-f", "raw", s(&img), &size.to_string()],
    );
    let set_len = |n: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(n)
            .unwrap()
    };
    set_len(size);
    let off = (1u64 << 20) - (64 << 10);
    let write = format!("write -P 0x5a {off} {}", size - off);
    run(
        "qemu-io",
        &["-t", "none", "-f", "raw", "-c", &write, s(&img)],
    );
    set_len(size);
    let small = dir.path().join("small.raw");
    std::fs::write(&small, vec![0x11u8; 1000]).unwrap();
    for file in [&img, &small] {
        for direct in ["on", "off"] {
            let opts = format!(
                "driver=raw,file.driver=file,file.filename={},cache.direct={direct}",
                s(file)
            );
            let args = ["map", "--output=json", "--image-opts", opts.as_str()];
            assert_eq!(
                run(VIMG, &args),
                run("qemu-img", &args),
                "{} cache.direct={direct}",
                s(file)
            );
        }
    }
}

/// `qemu-img bitmap` stores every bitmap anew whenever it writes an image (and `--remove`
/// first drops the entry on its own), writing tables and directories without padding: vimg's
/// bitmap commands leave the same layout, so the same file length and header, and
/// `measure -f raw` of the file (iotest 190) gives what qemu's gives.
#[test]
fn bitmap_commands_leave_qemus_layout() {
    if !qemu_available("bitmap_commands_leave_qemus_layout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            s(&huge),
            "2T",
        ],
    );
    let base = dir.path().join("base.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&base), "64M"]);
    run("qemu-img", &["bitmap", "--add", s(&base), "b0"]);
    let io = |cmds: &[&str]| {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(s(&base));
        run("qemu-io", &args);
    };
    io(&["write 0 1M", "write 40M 64k"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", s(&base), "b9"],
    );
    io(&["write 10M 3M"]);
    let huge_steps: &[&[&str]] = &[&["--add", "-g", "512", "b1"], &["--add", "-g", "2M", "b2"]];
    let base_steps: &[&[&str]] = &[
        &["--add", "b1"],
        &["--merge", "b0", "b1"],
        &["--disable", "b9"],
        &["--remove", "b0"],
        &["--clear", "b1"],
        &["--enable", "b1"],
        &["--remove", "b9"],
    ];
    for (src, steps) in [(&huge, huge_steps), (&base, base_steps)] {
        let q = dir.path().join("q.qcow2");
        let v = dir.path().join("v.qcow2");
        std::fs::copy(src, &q).unwrap();
        std::fs::copy(src, &v).unwrap();
        for step in steps {
            let (name, opts) = step.split_last().unwrap();
            for (tool, img) in [("qemu-img", &q), (VIMG, &v)] {
                let mut args = vec!["bitmap", "-f", "qcow2"];
                args.extend(opts);
                args.extend([s(img), *name]);
                run(tool, &args);
            }
            let (qb, vb) = (std::fs::read(&q).unwrap(), std::fs::read(&v).unwrap());
            assert_eq!(vb.len(), qb.len(), "{step:?}: file length");
            assert!(vb[..4096] == qb[..4096], "{step:?}: header differs");
            run("qemu-img", &["check", "-f", "qcow2", s(&v)]);
            // The required size depends on how sparse the file is (qemu's test hides it).
            let measure = |tool, img: &Path| {
                let out = run(tool, &["measure", "-O", "qcow2", "-f", "raw", s(img)]);
                out.lines()
                    .filter(|l| l.starts_with("fully"))
                    .collect::<String>()
            };
            assert_eq!(measure(VIMG, &v), measure("qemu-img", &q), "{step:?}");
        }
    }
}
