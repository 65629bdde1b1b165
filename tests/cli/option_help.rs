//! `-o help` (and `-o ?`) print what qemu-img prints, byte for byte, with its exit code: for
//! `create -f FMT` and `convert -O FMT` of every format vimg creates, without a file name (the
//! format's options and the note on the protocol's), with a file name (the format's and the
//! file protocol's, or a device's, under one heading), together with other options, and for
//! `amend` of the formats that amend; and the refusals around it (an invalid option list, a
//! protocol that does not create, an unknown protocol).

use crate::common::{self, assert_no_failures, run_in};

const VIMG: &str = env!("CARGO_BIN_EXE_vimg");
const FORMATS: &[&str] = &["qcow2", "raw", "luks", "vmdk", "vpc", "vdi", "vhdx"];

/// Runs `args` with both programs in `dir` and records a failure unless the exit codes and
/// the outputs (the program's name in messages aside) are equal.
fn same(dir: &std::path::Path, args: &[&str], failures: &mut Vec<String>) {
    let (cq, oq) = run_in(dir, "qemu-img", args);
    let (cv, ov) = run_in(dir, VIMG, args);
    let ov = ov.replace("vimg: ", "qemu-img: ");
    if (cq, &oq) != (cv, &ov) {
        failures.push(format!(
            "{args:?}:\n  qemu-img {cq}:\n{oq}\n  vimg {cv}:\n{ov}"
        ));
    }
}

#[test]
fn option_help_is_qemu_imgs_for_every_format() {
    if !common::qemu_available("option_help_is_qemu_imgs_for_every_format") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut failures = Vec::new();
    for &f in FORMATS {
        for args in [
            &["create", "-f", f, "-o", "help"][..],
            &["create", "-f", f, "-o", "?"],
            &["create", "-f", f, "-o", "help", "new.img"],
            &["create", "-f", f, "-o", "help", "new.img", "1M"],
            &["create", "-f", f, "-o", "size=1M,help", "file:new.img"],
            &["create", "-f", f, "-o", "bogus=1", "-o", "help"],
            &["create", "-f", f, "-o", "help", "/dev/null"],
            &["convert", "-O", f, "-o", "help"],
            &["convert", "-O", f, "-o", "help", "only-one-name"],
            &["convert", "-O", f, "-o", "help", "src.img", "dst.img"],
            &["amend", "-f", f, "-o", "help"],
        ] {
            same(d, args, &mut failures);
        }
    }
    // The file names were only named: nothing was created.
    assert!(!d.join("new.img").exists() && !d.join("dst.img").exists());
    assert_no_failures(&failures);
}

#[test]
fn help_requests_and_their_refusals_are_qemu_imgs() {
    if !common::qemu_available("help_requests_and_their_refusals_are_qemu_imgs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut failures = Vec::new();
    for args in [
        // Where qemu finds a help item: a name alone, even after an escaped comma.
        &["create", "-f", "vmdk", "-o", "foo,,help"][..],
        &["create", "-f", "vmdk", "-o", "subformat=x,,y,help"],
        &["create", "-o", "help"],
        &["convert", "-o", "help", "a", "b"],
        // Option lists qemu-img refuses before looking.
        &["create", "-f", "vmdk", "-o", ",help"],
        &["create", "-f", "vmdk", "-o", "help,"],
        &["create", "-f", "vmdk", "-o", "", "-o", "help"],
        &["convert", "-O", "vmdk", "-o", "help,", "a", "b"],
        // The protocol a file name selects.
        &["create", "-f", "raw", "-o", "help", "foo:bar"],
        &["create", "-f", "raw", "-o", "help", "./foo:bar"],
        &["create", "-f", "raw", "-o", "help", "null-co://"],
        &["create", "-f", "raw", "-o", "help", "host_device:/x"],
        &["create", "-f", "vmdk", "-o", "help", "nbd://localhost/x"],
        // amend: only qcow2 and luks amend.
        &["amend", "-f", "luks", "-o", "?"],
        &["amend", "-f", "vmdk", "-o", "help"],
    ] {
        same(d, args, &mut failures);
    }
    assert_no_failures(&failures);
}
