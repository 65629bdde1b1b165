//! Hostile input never panics, hangs or runs away with memory: every committed fixture, every
//! seed and crash file of every fuzz target (fuzz/corpus/<target>/, fuzz/artifacts/<target>/),
//! and many random mutations of the valid qcow2 fixtures (bytes flipped in the header, tables
//! and data) are run through the same entry points the fuzz targets use
//! (`vimg::qcow2::hostile`). Errors are the expected outcome for damaged images; a panic fails
//! the test, and so does an input that takes more than a few seconds.
//!
//! A fixed bug stays fixed: a crash file libFuzzer wrote goes to fuzz/artifacts/<target>/ and
//! is replayed here from then on. Every fuzz target must be listed in [`TARGETS`] (a test checks
//! that fuzz/fuzz_targets/ and the corpus directories have no target missing from it).

use proptest::prelude::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a fuzz target runs on one input.
type Entry = fn(&[u8]);

/// Each fuzz target (the name of its file in fuzz/fuzz_targets/ and of its corpus directories)
/// and the library function it runs. A new target adds one line here.
const TARGETS: &[(&str, Entry)] = &[
    ("qcow2_open_read", vimg::qcow2::hostile::open_and_read),
    ("qcow2_header", vimg::qcow2::hostile::parse_header),
    ("qcow2_check", vimg::qcow2::hostile::check),
    ("qcow2_repair", vimg::qcow2::hostile::repair),
    ("vma_read", vimg::vma::exercise),
    ("probe", vimg::probe::exercise),
    ("vpc_open_read", vimg::vpc::exercise),
    ("image_spec", vimg::image_spec::exercise),
    ("luks_header", vimg::crypto::luks::exercise),
    ("vdi_open_read", vimg::vdi::exercise),
    ("vmdk_cowd", vimg::vmdk::cowd::exercise),
    ("vmdk_sesparse", vimg::vmdk::sesparse::exercise),
    ("vhdx_open_read", vimg::vhdx::exercise),
    ("ova_open", vimg::ova::exercise),
    ("vmdk_open_read", vimg::vmdk::exercise),
    ("nbd_request", vimg::nbd::wire::exercise),
];

/// Longest one input may take (they take milliseconds; a hang shows up as this).
const SLOW: Duration = Duration::from_secs(10);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir`, sorted, as (name, bytes), gzip-compressed ones unpacked.
fn files_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        if !p.is_file() {
            continue;
        }
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
        out.push((name, bytes));
    }
    out
}

/// The qcow2 fixtures (at most 4 MiB each) of test-images/ and test-images/corrupt/, read
/// once per test run: the mutation seeds.
fn fixtures() -> &'static [(String, Vec<u8>)] {
    static F: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let mut v = Vec::new();
        for dir in ["test-images", "test-images/corrupt"] {
            for (name, bytes) in files_in(&root().join(dir)) {
                if bytes.starts_with(b"QFI\xfb") && bytes.len() <= 4 << 20 {
                    v.push((format!("{dir}/{name}"), bytes));
                }
            }
        }
        v
    })
}

/// Runs `f` on `bytes`, failing with `what` on a panic or when it takes too long.
fn run_one(f: Entry, bytes: &[u8], what: &str) {
    let start = Instant::now();
    let r = std::panic::catch_unwind(|| f(bytes));
    assert!(r.is_ok(), "panic on {what}");
    let took = start.elapsed();
    assert!(took < SLOW, "{what} took {took:?}");
}

#[test]
fn every_corpus_and_crash_file_of_every_target_is_handled() {
    let mut total = 0;
    for (target, f) in TARGETS {
        for kind in ["corpus", "artifacts"] {
            let dir = root().join("fuzz").join(kind).join(target);
            for (name, bytes) in files_in(&dir) {
                run_one(*f, &bytes, &format!("fuzz/{kind}/{target}/{name}"));
                total += 1;
            }
        }
        assert!(
            root().join("fuzz/corpus").join(target).is_dir(),
            "fuzz target {target} has no seed corpus in fuzz/corpus/{target}/"
        );
    }
    assert!(total > 0, "no corpus files found");
}

#[test]
fn every_fixture_goes_through_every_target() {
    let fixtures = fixtures();
    assert!(!fixtures.is_empty(), "no fixtures found in test-images/");
    for (name, bytes) in fixtures {
        for (target, f) in TARGETS {
            run_one(*f, bytes, &format!("{name} ({target})"));
        }
    }
}

#[test]
fn every_fuzz_target_and_corpus_is_replayed_here() {
    let known: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root().join("fuzz/fuzz_targets")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(t) = n.strip_suffix(".rs") {
                found.push(t.to_string());
            }
        }
    }
    for kind in ["corpus", "artifacts"] {
        if let Ok(rd) = std::fs::read_dir(root().join("fuzz").join(kind)) {
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                found.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    for t in found {
        assert!(
            known.contains(&t.as_str()),
            "fuzz target or corpus '{t}' is not replayed: add it to TARGETS in tests/hostile/hostile.rs"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random byte mutations of the fixtures, biased towards the metadata at the front of the
    /// file, through every target.
    #[test]
    fn mutated_images_never_panic(
        pick in any::<prop::sample::Index>(),
        target in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..12),
    ) {
        let fixtures = fixtures();
        prop_assume!(!fixtures.is_empty());
        let (name, base) = &fixtures[pick.index(fixtures.len())];
        let mut bytes = base.clone();
        for (at, val, front) in edits {
            let span = if front { bytes.len().min(4096) } else { bytes.len() };
            if span > 0 {
                bytes[at.index(span)] = val;
            }
        }
        let (t, f) = TARGETS[target.index(TARGETS.len())];
        run_one(f, &bytes, &format!("a mutation of {name} ({t})"));
    }
}
