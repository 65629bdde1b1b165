//! VMA archive benchmarks: `backup create` (plain and zstd), `verify`, and `extract` to raw
//! and to qcow2, through the library, on a 64 MiB raw disk whose every other MiB holds data
//! (one 4 KiB block in eight zero) and the rest holes; with `convert` of the same disk to raw
//! as the baseline a backup should cost little more than. The 2 GiB comparison is
//! `scripts/bench-backup.sh`.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::Path;
use vimg::block::ImageFormat;
use vimg::open::{open_image, OpenOptions};
use vimg::ops::backup::{self, ArchivePath, CreateOptions, ExtractOptions};
use vimg::ops::convert::{convert, ConvertOptions};
use vimg::vma::stream::Compression;

const SIZE: u64 = 64 << 20;

/// The source disk: data in even MiBs (pseudo-random, every eighth 4 KiB block zero), holes in
/// odd ones.
fn make_source(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut mib = vec![0u8; 1 << 20];
    for (i, word) in mib.chunks_mut(8).enumerate() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if (i * 8 / 4096) % 8 != 7 {
            word.copy_from_slice(&state.to_le_bytes());
        }
    }
    for m in (0..SIZE >> 20).step_by(2) {
        std::os::unix::fs::FileExt::write_all_at(&f, &mib, m << 20).unwrap();
    }
}

fn create(src: &Path, archive: &Path, compression: Compression) {
    std::fs::remove_file(archive).ok();
    let img = open_image(src, &OpenOptions::default()).unwrap();
    let opts = CreateOptions {
        configs: vec![],
        compression,
    };
    let path = ArchivePath::File(archive.to_path_buf());
    backup::create(&path, &[("drive-scsi0", img.as_ref())], &opts, None).unwrap();
}

fn extract(archive: &Path, dir: &Path, format: ImageFormat) {
    std::fs::remove_dir_all(dir).ok();
    let opts = ExtractOptions {
        format,
        ..ExtractOptions::default()
    };
    let plan =
        backup::prepare_extract(&ArchivePath::File(archive.to_path_buf()), dir, &opts).unwrap();
    plan.run(None).unwrap();
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    make_source(&src);
    let archive = d.join("a.vma");
    create(&src, &archive, Compression::None);

    let mut g = c.benchmark_group("vma");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE));
    let conv = d.join("conv.raw");
    g.bench_function("convert-raw-baseline", |b| {
        b.iter(|| {
            let img = open_image(&src, &OpenOptions::default()).unwrap();
            convert(&[img.as_ref()], &conv, &ConvertOptions::default(), None).unwrap();
        })
    });
    let out = d.join("b.vma");
    g.bench_function("create", |b| {
        b.iter(|| create(&src, &out, Compression::None))
    });
    g.bench_function("create-zstd", |b| {
        b.iter(|| create(&src, &out, Compression::Zstd))
    });
    g.bench_function("verify", |b| {
        b.iter(|| backup::verify(&ArchivePath::File(archive.clone()), None).unwrap())
    });
    let x = d.join("x");
    g.bench_function("extract-raw", |b| {
        b.iter(|| extract(&archive, &x, ImageFormat::Raw))
    });
    g.bench_function("extract-qcow2", |b| {
        b.iter(|| extract(&archive, &x, ImageFormat::Qcow2))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
