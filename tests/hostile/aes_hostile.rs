//! Damaged legacy AES encrypted qcow2 images through the fuzz entry points
//! (`vimg::qcow2::hostile`), which open an encrypted image with a key so that decryption runs:
//! an image qemu made and wrote (data at unaligned offsets, zeros, a snapshot, a size that is
//! not a multiple of the cluster size), with bytes of its metadata and data changed at random,
//! must never make vimg panic; the undamaged image reads as qemu reads it with that key.

use crate::common::{self, Rng};
use vimg::qcow2::hostile;

#[test]
fn damaged_encrypted_images_never_panic() {
    if !common::qemu_available("aes_hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let obj = "secret,id=fuzz,data=fuzz";
    let p = img.to_str().unwrap();
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            obj,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=fuzz,cluster_size=4096",
            p,
            "300000",
        ],
    );
    let spec = format!("driver=qcow2,file.filename={p},encrypt.key-secret=fuzz");
    let io = |cmd: &str| {
        common::run(
            "qemu-io",
            &["--object", obj, "--image-opts", "-c", cmd, &spec],
        )
    };
    io("write -P 0x61 1000 70000");
    io("write -z 90000 10000");
    common::run(
        "qemu-img",
        &[
            "snapshot",
            "--object",
            obj,
            "-c",
            "s",
            "--image-opts",
            &spec,
        ],
    );
    io("write -P 0x62 200001 5000");
    let bytes = std::fs::read(&img).unwrap();
    hostile::open_and_read(&bytes);
    // The undamaged image reads as qemu reads it with that key.
    let raw = dir.path().join("a.raw");
    common::run(
        "qemu-img",
        &[
            "convert",
            "--object",
            obj,
            "--image-opts",
            &spec,
            "-O",
            "raw",
            raw.to_str().unwrap(),
        ],
    );
    let opener = vimg::opener::Opener::new();
    opener.set_secrets(vimg::secret::Secrets::from_objects(&[obj]).unwrap());
    let key = vimg::opener::EncryptOptions {
        key_secret: Some("fuzz".into()),
        format: None,
    };
    opener.set_encryption(&img, key);
    let opts = vimg::open::OpenOptions {
        opener,
        ..Default::default()
    };
    let image = vimg::open::open_image(&img, &opts).unwrap();
    let mut got = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut got, vimg::GuestOffset(0)).unwrap();
    assert!(got == std::fs::read(&raw).unwrap());
    let mut rng = Rng::seeded(0xf022);
    for round in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(8) {
            let at = match round % 3 {
                // The header and the first metadata clusters.
                0 => rng.below(4096.min(b.len() as u64)),
                // Anywhere.
                _ => rng.below(b.len() as u64),
            } as usize;
            b[at] = rng.next() as u8;
        }
        hostile::open_and_read(&b);
        hostile::check(&b);
        if round % 5 == 0 {
            hostile::repair(&b);
        }
    }
}
