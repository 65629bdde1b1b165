//! Read-path benchmarks: whole-disk reads and block-status walks of qcow2 images (plain,
//! zlib-compressed, zstd-compressed) that qemu-img builds from a 64 MiB pseudo-random raw disk
//! (half data, half holes). Skipped with a message when qemu-img is absent.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::Path;
use std::process::Command;
use vimg::open::{open_image, OpenOptions};
use vimg::GuestOffset;

const SIZE: u64 = 64 << 20;

fn make_source(dir: &Path) -> Option<()> {
    let raw = dir.join("src.raw");
    let f = std::fs::File::create(&raw).ok()?;
    f.set_len(SIZE).ok()?;
    // Every other MiB holds compressible-but-not-trivial data.
    let mut x = 0x1234_5678_u64;
    let mut buf = vec![0u8; 1 << 20];
    for mib in (0..SIZE >> 20).step_by(2) {
        for (i, b) in buf.iter_mut().enumerate() {
            if i % 8 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            *b = (x >> ((i % 8) * 8)) as u8 & 0x3f;
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, mib << 20).ok()?;
    }
    for (name, extra) in [
        ("plain", vec![]),
        ("zlib", vec!["-c"]),
        ("zstd", vec!["-c", "-o", "compression_type=zstd"]),
    ] {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend(extra);
        let out = dir.join(format!("{name}.qcow2"));
        args.extend([raw.to_str()?, out.to_str()?]);
        Command::new("qemu-img")
            .args(&args)
            .status()
            .ok()?
            .success()
            .then_some(())?;
    }
    Some(())
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    if make_source(dir.path()).is_none() {
        eprintln!("read benchmark: skipping: qemu-img not found");
        return;
    }
    let mut g = c.benchmark_group("qcow2-read");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE));
    for name in ["plain", "zlib", "zstd"] {
        let img = open_image(
            &dir.path().join(format!("{name}.qcow2")),
            &OpenOptions::default(),
        )
        .unwrap();
        let mut buf = vec![0u8; 2 << 20];
        g.bench_function(format!("read-all-{name}"), |b| {
            b.iter(|| {
                for off in (0..SIZE).step_by(buf.len()) {
                    img.read_at(&mut buf, GuestOffset(off)).unwrap();
                }
            })
        });
        g.bench_function(format!("block-status-walk-{name}"), |b| {
            b.iter(|| {
                let mut off = 0;
                while off < SIZE {
                    off += img.block_status(GuestOffset(off), SIZE - off).unwrap().len;
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
