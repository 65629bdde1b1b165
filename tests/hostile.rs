//! Hostile input never panics: every committed fixture and fuzz corpus file, and many random
//! mutations of the valid qcow2 fixtures (bytes flipped in the header, tables and data), are
//! opened and exercised through `vimg::qcow2::exercise` (block status, reads, info, check).
//! Errors are the expected outcome for damaged images; a panic fails the test.

use proptest::prelude::*;
use std::io::Read;
use std::path::Path;

/// The bytes of every qcow2 fixture and corpus file (gzip-compressed fixtures unpacked), read
/// once per test run.
fn seeds() -> &'static [(String, Vec<u8>)] {
    static SEEDS: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(load_seeds)
}

fn load_seeds() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in [
        "test-images",
        "fuzz/corpus/qcow2_open_read",
        "fuzz/artifacts/qcow2_open_read",
    ] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let Ok(raw) = std::fs::read(&p) else { continue };
            let bytes = if name.ends_with(".gz") {
                let mut v = Vec::new();
                if flate2::read::GzDecoder::new(&raw[..])
                    .read_to_end(&mut v)
                    .is_err()
                {
                    continue;
                }
                v
            } else {
                raw
            };
            // Mutation seeds are small qcow2 files; corpus files are taken whatever they hold.
            if dir != "test-images" || (bytes.starts_with(b"QFI\xfb") && bytes.len() <= 4 << 20) {
                out.push((format!("{dir}/{name}"), bytes));
            }
        }
    }
    out
}

#[test]
fn every_fixture_and_corpus_file_is_handled_without_panic() {
    let seeds = seeds();
    assert!(!seeds.is_empty(), "no fixtures found in test-images/");
    for (name, bytes) in seeds {
        let r = std::panic::catch_unwind(|| vimg::qcow2::exercise(bytes));
        assert!(r.is_ok(), "panic on {name}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random byte mutations, biased towards the metadata at the front of the file.
    #[test]
    fn mutated_images_never_panic(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..12),
    ) {
        let seeds = seeds();
        prop_assume!(!seeds.is_empty());
        let (_, base) = &seeds[pick.index(seeds.len())];
        let mut bytes = base.clone();
        for (at, val, front) in edits {
            let span = if front { bytes.len().min(4096) } else { bytes.len() };
            if span > 0 {
                bytes[at.index(span)] = val;
            }
        }
        vimg::qcow2::exercise(&bytes);
    }
}
