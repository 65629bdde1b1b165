//! Random backing chains of raw and qcow2 layers (different virtual sizes, cluster sizes and
//! qcow2 options), built with qemu's tools, for the commit and rebase oracles. Layers name
//! their backing files by relative names, so a chain's directory can be copied and the same
//! operation run by vimg on one copy and by qemu-img on the other.

use super::{run, run_status, Rng};
use std::path::{Path, PathBuf};

/// One layer of a chain.
#[derive(Debug, Clone)]
pub struct Layer {
    /// File name inside the chain's directory.
    pub name: String,
    /// `raw` or `qcow2`.
    pub format: &'static str,
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size (512 for raw).
    pub cluster: u64,
    /// `qemu-img create -o` options (qcow2).
    pub opts: String,
}

impl Layer {
    /// A random qcow2 layer named `name`.
    pub fn random_qcow2(rng: &mut Rng, name: &str) -> Layer {
        let cluster = [512u64, 1024, 4096, 65536, 65536, 2 << 20][rng.below(6) as usize];
        let mut opts = vec![format!("cluster_size={cluster}")];
        if cluster >= 16384 && rng.below(3) == 0 {
            opts.push("extended_l2=on".into());
        } else if rng.below(6) == 0 {
            opts.push("compat=0.10".into());
        }
        if rng.below(5) == 0 && !opts.iter().any(|o| o.contains("compat")) {
            opts.push("compression_type=zstd".into());
        }
        Layer {
            name: name.to_string(),
            format: "qcow2",
            size: random_size(rng),
            cluster,
            opts: opts.join(","),
        }
    }

    /// A raw layer named `name`.
    pub fn random_raw(rng: &mut Rng, name: &str) -> Layer {
        Layer {
            name: name.to_string(),
            format: "raw",
            size: random_size(rng),
            cluster: 512,
            opts: String::new(),
        }
    }

    /// Whether the layer is qcow2.
    pub fn is_qcow2(&self) -> bool {
        self.format == "qcow2"
    }
}

/// A virtual size between 1 and 6 MiB, in 64 KiB steps plus sometimes a few odd sectors.
pub fn random_size(rng: &mut Rng) -> u64 {
    let mut s = (16 + rng.below(80)) * 65536;
    if rng.below(3) == 0 {
        s += rng.below(64) * 512;
    }
    s
}

/// Creates `layers` in `dir`, bottom first, each backed by the one before (by its relative
/// name), and fills each with random writes.
pub fn build(dir: &Path, layers: &[Layer], rng: &mut Rng) {
    for (i, l) in layers.iter().enumerate() {
        add_layer(dir, l, i.checked_sub(1).map(|j| &layers[j]), rng);
    }
}

/// Creates layer `l` in `dir`, backed by `below` (by its relative name) if given, and fills it
/// with random writes.
pub fn add_layer(dir: &Path, l: &Layer, below: Option<&Layer>, rng: &mut Rng) {
    let path = dir.join(&l.name);
    let size = l.size.to_string();
    let mut args = vec!["create", "-q", "-f", l.format];
    if !l.opts.is_empty() {
        args.extend(["-o", &l.opts]);
    }
    if let Some(b) = below {
        assert!(l.is_qcow2(), "only qcow2 layers have a backing file");
        args.extend(["-b", &b.name, "-F", b.format]);
    }
    let p = path.to_str().unwrap().to_string();
    args.extend([p.as_str(), size.as_str()]);
    run("qemu-img", &args);
    let cmds = random_writes(rng, l);
    let mut io = vec!["-f".to_string(), l.format.to_string()];
    for c in &cmds {
        io.extend(["-c".to_string(), c.clone()]);
    }
    io.push(p);
    let io: Vec<&str> = io.iter().map(String::as_str).collect();
    let (code, out) = run_status("qemu-io", &io);
    assert!(
        code == 0 && !out.contains("failed"),
        "qemu-io on {l:?}: {cmds:?}: {out}"
    );
}

/// qemu-io commands writing random data, zeros, compressed clusters and discards into `l`.
/// Compressed clusters come first (qemu writes them only where nothing is allocated yet).
pub fn random_writes(rng: &mut Rng, l: &Layer) -> Vec<String> {
    let sectors = l.size / 512;
    let mut cmds = Vec::new();
    let mut compressed = std::collections::BTreeSet::new();
    if l.is_qcow2() && l.cluster >= 4096 && l.size >= l.cluster {
        for _ in 0..rng.below(3) {
            compressed.insert(rng.below(l.size / l.cluster));
        }
    }
    for c in compressed {
        let pattern = 1 + rng.below(250);
        cmds.push(format!(
            "write -c -P {pattern} {} {}",
            c * l.cluster,
            l.cluster
        ));
    }
    for _ in 0..(2 + rng.below(6)) {
        let kind = rng.below(10);
        let pattern = 1 + rng.below(250);
        let start = rng.below(sectors);
        let len = (1 + rng.below(512.min(sectors - start))) * 512;
        let off = start * 512;
        cmds.push(match kind {
            0..=2 => format!("write -z {off} {len}"),
            3 if l.is_qcow2() => format!("discard {off} {len}"),
            _ => format!("write -P {pattern} {off} {len}"),
        });
    }
    cmds
}

/// Copies every file of `from` into `to` (created).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `qemu-img compare -f FA -F FB A B`: exit code and output.
pub fn compare(a: &Path, fa: &str, b: &Path, fb: &str) -> (i32, String) {
    run_status(
        "qemu-img",
        &[
            "compare",
            "-f",
            fa,
            "-F",
            fb,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    )
}

/// What `qemu-img info --output json` says about a layer's size and backing file.
pub fn backing_info(path: &Path, format: &str) -> (u64, Option<String>, Option<String>) {
    let out = run(
        "qemu-img",
        &[
            "info",
            "-f",
            format,
            "--output",
            "json",
            path.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    (
        v["virtual-size"].as_u64().unwrap(),
        s("backing-filename"),
        s("backing-filename-format"),
    )
}

/// `qemu-img check` on the qcow2 image `path` alone (its backing file is not opened, so it
/// need not exist): exit code and output.
pub fn check(path: &Path) -> (i32, String) {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": path.to_str().unwrap()},
    });
    run_status("qemu-img", &["check", &format!("json:{spec}")])
}

/// Compares two copies of the same chain after the same operation, layer by layer: contents
/// (qemu-img compare), virtual size and backing file as qemu-img info reports them, and
/// `qemu-img check` clean on every qcow2 layer of `ours`. Returns the differences.
pub fn compare_chains(ours: &Path, theirs: &Path, layers: &[Layer], what: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for l in layers {
        let (a, b) = (ours.join(&l.name), theirs.join(&l.name));
        let (code, out) = compare(&a, l.format, &b, l.format);
        if code != 0 {
            bad.push(format!("{what}: {} differs from qemu's: {out}", l.name));
        }
        let (ia, ib) = (backing_info(&a, l.format), backing_info(&b, l.format));
        if ia != ib {
            bad.push(format!(
                "{what}: {} info (size, backing, format) {ia:?}, qemu's {ib:?}",
                l.name
            ));
        }
        if l.is_qcow2() {
            let (code, out) = check(&a);
            if code != 0 {
                bad.push(format!(
                    "{what}: qemu-img check {} exit {code}: {out}",
                    l.name
                ));
            }
        }
    }
    bad
}

/// A fresh directory under the system's temporary directory.
pub fn fresh_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vimg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The bytes of every regular file in `dir`, by name (to prove a refused command changed
/// nothing).
pub fn dir_bytes(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}
