//! qemu's `blkdebug` fault-injection driver in vimg ([`vimg::blkdebug`]), with qemu-img as
//! the oracle: the same image names (`blkdebug:CONF:IMAGE`, `json:`, `--image-opts`) open the
//! same images, injected errors fail the same commands with qemu-img's words, the injected
//! errno as the cause and qemu-img's exit code, and a failed command leaves its inputs as they
//! were and no output behind.

use crate::common;

use common::{qemu_available, qemu_create, qemu_io};
use std::path::Path;

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");

fn vimg(dir: &Path, args: &[&str]) -> (i32, String) {
    common::run_in(dir, VIMG, args)
}

fn qemu_img(dir: &Path, args: &[&str]) -> (i32, String) {
    common::run_in(dir, "qemu-img", args)
}

/// Output with the program name (`vimg:`/`qemu-img:`) taken out.
fn words(out: &str) -> String {
    out.replace("qemu-img: ", "").replace("vimg: ", "")
}

/// A configuration file failing every read of guest data with EIO, as qemu's iotest 074 does.
fn eio_on_reads(dir: &Path) {
    std::fs::write(
        dir.join("blkdebug.conf"),
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce =\"off\"\n",
    )
    .unwrap();
}

#[test]
fn compare_reports_an_injected_read_error_as_qemu_img_does() {
    if !qemu_available("compare_reports_an_injected_read_error_as_qemu_img_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    eio_on_reads(d);
    qemu_create(&d.join("t.qcow2"), "qcow2", "", None, 1 << 30);
    std::fs::copy(d.join("t.qcow2"), d.join("same.qcow2")).unwrap();
    qemu_create(&d.join("empty.qcow2"), "qcow2", "", None, 0);
    qemu_io(
        &d.join("t.qcow2"),
        "qcow2",
        &["write -P 102 512 512".to_string()],
    );
    let before = std::fs::read(d.join("t.qcow2")).unwrap();
    for other in ["same.qcow2", "empty.qcow2"] {
        let args = ["compare", "blkdebug:blkdebug.conf:t.qcow2", other];
        let (qc, qout) = qemu_img(d, &args);
        let (vc, vout) = vimg(d, &args);
        assert_eq!((vc, words(&vout)), (qc, words(&qout)), "{other}");
        assert_eq!(vc, 4);
        assert!(
            vout.contains("Error while reading offset 0 of blkdebug:blkdebug.conf:t.qcow2: Input/output error"),
            "{vout}"
        );
    }
    // Without the rules, the same image compares fine.
    let (c, out) = vimg(d, &["compare", "blkdebug::t.qcow2", "t.qcow2"]);
    assert_eq!(c, 0, "{out}");
    assert_eq!(std::fs::read(d.join("t.qcow2")).unwrap(), before);
}

#[test]
fn convert_fails_on_an_injected_read_error_and_leaves_no_output() {
    if !qemu_available("convert_fails_on_an_injected_read_error_and_leaves_no_output") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    eio_on_reads(d);
    qemu_create(&d.join("t.qcow2"), "qcow2", "", None, 4 << 20);
    qemu_io(
        &d.join("t.qcow2"),
        "qcow2",
        &["write -P 7 1M 64k".to_string()],
    );
    for fmt in ["qcow2", "raw"] {
        let (c, out) = vimg(
            d,
            &[
                "convert",
                "-O",
                fmt,
                "blkdebug:blkdebug.conf:t.qcow2",
                "out",
            ],
        );
        assert_eq!(c, 1, "{out}");
        assert!(
            out.contains("error while reading at byte 1048576")
                && out.contains("Input/output error"),
            "{out}"
        );
        assert!(!d.join("out").exists(), "{fmt}: output left behind");
    }
    // The raw driver emits read_aio too.
    qemu_create(&d.join("t.raw"), "raw", "", None, 1 << 20);
    let (c, out) = vimg(
        d,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            "blkdebug:blkdebug.conf:t.raw",
            "out",
        ],
    );
    assert_eq!(c, 1, "{out}");
    assert!(out.contains("Input/output error"), "{out}");
    assert!(!d.join("out").exists(), "raw: output left behind");
    // An errno other than EIO comes out as itself; a rule for an event vimg never emits
    // (documented) changes nothing.
    std::fs::write(
        d.join("enospc.conf"),
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\n\
         [inject-error]\nevent = \"l2_load\"\n",
    )
    .unwrap();
    let (c, out) = vimg(
        d,
        &[
            "convert",
            "-O",
            "raw",
            "blkdebug:enospc.conf:t.qcow2",
            "out",
        ],
    );
    assert_eq!(c, 1, "{out}");
    assert!(out.contains("No space left on device"), "{out}");
    std::fs::write(d.join("l2.conf"), "[inject-error]\nevent = \"l2_load\"\n").unwrap();
    let (c, out) = vimg(
        d,
        &["convert", "-O", "raw", "blkdebug:l2.conf:t.qcow2", "out"],
    );
    assert_eq!(c, 0, "{out}");
    let (c, out) = qemu_img(
        d,
        &["compare", "-f", "qcow2", "-F", "raw", "t.qcow2", "out"],
    );
    assert_eq!(c, 0, "{out}");
}

#[test]
fn commit_into_a_failing_backing_file_reports_the_cause_and_keeps_the_data() {
    if !qemu_available("commit_into_a_failing_backing_file_reports_the_cause_and_keeps_the_data") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&base, "qcow2", "", None, 1 << 20);
    qemu_io(&base, "qcow2", &["write -P 1 0 1M".to_string()]);
    // As qemu's iotest 020: the backing file is named by a json: name with a blkdebug node
    // failing the first write of guest data with ENOSPC.
    let backing = format!(
        "json:{{'driver': 'qcow2', 'file': {{ 'driver': 'blkdebug', 'inject-error': \
         [{{ 'event': 'write_aio', 'errno': 28, 'once': true }}], 'image': \
         {{ 'driver': 'file', 'filename': '{}' }}}}}}",
        base.display()
    );
    let (c, out) = vimg(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            &backing,
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("'driver': 'qcow2',, 'file'"), "{out}");
    qemu_io(
        &d.join("top.qcow2"),
        "qcow2",
        &["write -P 2 0 64k".to_string()],
    );
    let top_before = std::fs::read(d.join("top.qcow2")).unwrap();
    let (qc, qout) = {
        // qemu-img on a copy, for its words and exit code.
        std::fs::copy(&base, d.join("base.copy")).unwrap();
        let r = qemu_img(d, &["commit", "top.qcow2"]);
        std::fs::copy(d.join("base.copy"), &base).unwrap();
        std::fs::write(d.join("top.qcow2"), &top_before).unwrap();
        r
    };
    let (vc, vout) = vimg(d, &["commit", "top.qcow2"]);
    assert_eq!((vc, words(&vout)), (qc, words(&qout)));
    assert!(
        vout.contains("Block job failed: No space left on device"),
        "{vout}"
    );
    // The overlay is as it was, the base still holds its own data and is clean.
    assert_eq!(std::fs::read(d.join("top.qcow2")).unwrap(), top_before);
    let (c, out) = qemu_img(d, &["check", "base.qcow2"]);
    assert_eq!(c, 0, "{out}");
    let (c, out) = common::run_in(
        d,
        "qemu-io",
        &["-c", "read -P 1 0 1M", "-f", "qcow2", "base.qcow2"],
    );
    assert!(
        c == 0 && !out.contains("Pattern verification failed"),
        "{out}"
    );
}

#[test]
fn image_opts_and_json_names_open_the_image_as_qemu_does() {
    if !qemu_available("image_opts_and_json_names_open_the_image_as_qemu_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_create(&d.join("t.qcow2"), "qcow2", "", None, 8 << 20);
    qemu_io(
        &d.join("t.qcow2"),
        "qcow2",
        &[
            "write -P 3 0 64k".to_string(),
            "write -z 1M 64k".to_string(),
        ],
    );
    let path = d.join("t.qcow2");
    let opts = format!(
        "driver=blkdebug,image.driver=qcow2,image.file.driver=file,image.file.filename={},\
         align=4k,max-transfer=64k,opt-write-zero=4k",
        path.display()
    );
    let json = format!(
        "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"blkdebug\",\"align\":512,\
         \"image\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}}}",
        path.display()
    );
    for args in [
        vec!["map", "--image-opts", opts.as_str()],
        vec!["map", "--output=json", json.as_str()],
        vec!["map", "blkdebug::t.qcow2"],
    ] {
        let (qc, qout) = qemu_img(d, &args);
        let (vc, vout) = vimg(d, &args);
        // qemu names a blkdebug: node by its whole name in map's File column; vimg names the
        // file (a known difference, see the module documentation of vimg::blkdebug).
        let qout = qout.replace("blkdebug::", "");
        assert_eq!((vc, vout), (qc, qout), "{args:?}");
    }
    // Bad blkdebug options are refused, as by qemu.
    for bad in [
        format!(
            "driver=blkdebug,image.driver=qcow2,image.file.filename={},align=3",
            path.display()
        ),
        format!(
            "driver=blkdebug,image.driver=qcow2,image.file.filename={},bogus=1",
            path.display()
        ),
    ] {
        let (qc, _) = qemu_img(d, &["info", "--image-opts", &bad]);
        let (vc, vout) = vimg(d, &["info", "--image-opts", &bad]);
        assert_eq!(vc, qc, "{bad}: {vout}");
    }
    for (conf, text) in [
        ("none.conf", None),
        ("garbage.conf", Some("garbage\n")),
        ("group.conf", Some("[no-such-group]\n")),
        (
            "event.conf",
            Some("[inject-error]\nevent = \"l1_grow.alloc_table\"\n"),
        ),
        ("noevent.conf", Some("[inject-error]\nerrno = \"5\"\n")),
        (
            "once.conf",
            Some("[inject-error]\nevent = \"read_aio\"\nonce = \"x\"\n"),
        ),
    ] {
        if let Some(t) = text {
            std::fs::write(d.join(conf), t).unwrap();
        }
        let name = format!("blkdebug:{conf}:t.qcow2");
        let (qc, qout) = qemu_img(d, &["info", &name]);
        let (vc, vout) = vimg(d, &["info", &name]);
        assert_eq!(vc, qc, "{conf}: {vout}");
        assert!(vout.contains(&format!("Could not open '{name}'")), "{vout}");
        assert_eq!(words(&vout), words(&qout), "{conf}");
    }
}

#[test]
fn convert_into_a_failing_target_reports_the_cause_and_leaves_it_consistent() {
    if !qemu_available("convert_into_a_failing_target_reports_the_cause_and_leaves_it_consistent") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_create(&d.join("src.qcow2"), "qcow2", "", None, 4 << 20);
    qemu_io(
        &d.join("src.qcow2"),
        "qcow2",
        &["write -P 9 0 1M".to_string()],
    );
    std::fs::write(
        d.join("w.conf"),
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\n",
    )
    .unwrap();
    for who in ["qemu-img", VIMG] {
        qemu_create(&d.join("dst.qcow2"), "qcow2", "", None, 4 << 20);
        let args = [
            "convert",
            "-n",
            "-O",
            "qcow2",
            "src.qcow2",
            "blkdebug:w.conf:dst.qcow2",
        ];
        let (c, out) = common::run_in(d, who, &args);
        assert_eq!(c, 1, "{who}: {out}");
        assert!(
            out.contains("error while writing at byte 0")
                && out.contains("No space left on device"),
            "{who}: {out}"
        );
        let (c, out) = qemu_img(d, &["check", "dst.qcow2"]);
        assert_eq!(c, 0, "{who}: {out}");
    }
}
