//! Write-path benchmarks: `convert` through the library (raw to raw, raw to qcow2, qcow2 to
//! raw, qcow2 to qcow2, and compressed with zlib and zstd) on a 64 MiB disk that is half
//! pseudo-random compressible data and half holes, plus allocating 64 KiB guest writes into a
//! fresh qcow2 image. The 2 GiB comparison against qemu-img is `scripts/bench-vs-qemu.sh`; these measure
//! the same paths quickly and repeatably.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::Path;
use vimg::block::ImageFormat;
use vimg::open::{open_image, OpenOptions};
use vimg::ops::convert::{convert, ConvertOptions};
use vimg::GuestOffset;

const SIZE: u64 = 64 << 20;

/// Writes the raw source: every other MiB holds data that compresses to about 3/4.
fn make_source(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
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
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, mib << 20).unwrap();
    }
}

fn opts(format: ImageFormat, compress: bool, target: &[&str]) -> ConvertOptions {
    ConvertOptions {
        output_format: format,
        compress,
        target_options: target.iter().map(|s| s.to_string()).collect(),
        ..ConvertOptions::default()
    }
}

fn run_convert(src: &Path, dst: &Path, o: &ConvertOptions) {
    let img = open_image(src, &OpenOptions::default()).unwrap();
    convert(&[img.as_ref()], dst, o, None).unwrap();
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    make_source(&raw);
    let qcow2 = d.join("src.qcow2");
    run_convert(&raw, &qcow2, &opts(ImageFormat::Qcow2, false, &[]));

    let mut g = c.benchmark_group("convert");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE));
    let cases = [
        ("raw-to-raw", &raw, opts(ImageFormat::Raw, false, &[])),
        ("raw-to-qcow2", &raw, opts(ImageFormat::Qcow2, false, &[])),
        ("qcow2-to-raw", &qcow2, opts(ImageFormat::Raw, false, &[])),
        (
            "qcow2-to-qcow2",
            &qcow2,
            opts(ImageFormat::Qcow2, false, &[]),
        ),
        (
            "raw-to-qcow2-zlib",
            &raw,
            opts(ImageFormat::Qcow2, true, &[]),
        ),
        (
            "raw-to-qcow2-zstd",
            &raw,
            opts(ImageFormat::Qcow2, true, &["compression_type=zstd"]),
        ),
    ];
    for (name, src, o) in &cases {
        let out = d.join(format!("{name}.out"));
        g.bench_function(*name, |b| b.iter(|| run_convert(src, &out, o)));
        std::fs::remove_file(&out).ok();
    }
    g.finish();

    let mut g = c.benchmark_group("qcow2-write");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE));
    let data = vec![0x5au8; 64 << 10];
    g.bench_function("allocating-64k-writes", |b| {
        b.iter(|| {
            let path = d.join("w.qcow2");
            std::fs::remove_file(&path).ok();
            vimg::ops::create::create(&vimg::ops::create::CreateArgs {
                format: ImageFormat::Qcow2,
                filename: path.clone(),
                options: vec![],
                backing_file: None,
                backing_format: None,
                unsafe_backing: false,
                size: Some(SIZE.to_string()),
                opener: Default::default(),
            })
            .unwrap();
            let img = open_image(
                &path,
                &OpenOptions {
                    writable: true,
                    ..OpenOptions::default()
                },
            )
            .unwrap();
            for off in (0..SIZE).step_by(data.len()) {
                img.write_at(&data, GuestOffset(off)).unwrap();
            }
            img.flush().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
