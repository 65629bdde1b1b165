//! The name qemu gives an image opened with options (`--image-opts`, `json:`), as its
//! `bdrv_refresh_filename` builds it: the file's name when nothing but the format and the file
//! were chosen, otherwise `json:{...}` holding the options that change what the image reads
//! (qemu's "strong" runtime options) with the driver and the file node. `qemu-img info`
//! prints it (`image: json:{"encrypt.key-secret": "s", "driver": "qcow2", "file": {...}}`),
//! and commands that resolve names relative to the image, or look for a file in its backing
//! chain, compare against it.
//!
//! Strong options of the drivers vimg has: qcow2's `encrypt.key-secret`, raw LUKS's
//! `key-secret`, and raw's `offset` and `size`. Cache, locking, aio, discard and qcow2 cache options are not strong: they leave
//! the plain file name. A backing file opened with strong options of its own (given as
//! `backing.encrypt.key-secret`) is "overridden": the overlay's name then includes it under
//! `backing`, when the backing file is opened (not for `info`, which opens none).
//!
//! qemu prints the keys of a JSON object in the order of its dictionary's hash buckets;
//! [`key_order`] reproduces that order (keys of one level are few, so buckets do not collide
//! for the names used here).

use std::collections::BTreeMap;

/// The strong options of the format `format` (`qcow2`, `raw`) that `options` (an image spec's
/// options, dotted keys) gives, in their dotted form.
pub fn strong_options(format: &str, options: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let strong: &[&str] = match format {
        "qcow2" => &["encrypt.key-secret"],
        "raw" => &["offset", "size"],
        "luks" => &["key-secret"],
        _ => &[],
    };
    strong
        .iter()
        .filter_map(|k| options.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect()
}

/// A JSON object as qemu builds it for a node's name: a list of keys and values.
enum Value {
    Str(String),
    Obj(Vec<(String, Value)>),
}

fn render(v: &Value, out: &mut String) {
    match v {
        Value::Str(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
        Value::Obj(entries) => {
            let mut entries: Vec<&(String, Value)> = entries.iter().collect();
            entries.sort_by_key(|(k, _)| key_order(k));
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                render(v, out);
            }
            out.push('}');
        }
    }
}

/// The bucket of `key` in qemu's QDict (512 buckets, the hash of Samba's tdb), which orders
/// the keys of the JSON qemu prints.
pub fn key_order(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i as u32 * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// The options of one node of an image: its format, file and strong options, and the
/// backing file's node when it was overridden.
pub struct Node {
    /// The format driver (`qcow2`, `raw`).
    pub format: String,
    /// The file's protocol driver (`file`, `host_device`).
    pub protocol: String,
    /// The file's name, as given.
    pub filename: String,
    /// The strong options given ([`strong_options`]).
    pub strong: Vec<(String, String)>,
    /// The backing file's node, when it was opened with strong options of its own.
    pub backing: Option<Box<Node>>,
}

impl Node {
    /// The node of an image of format `format` in the file `filename`, opened with the spec
    /// options `options`; with `with_backing`, a backing file given strong options
    /// (`backing.KEY`) is included, as it is named in qemu when the backing file is opened.
    pub fn from_options(
        format: &str,
        filename: &str,
        options: &BTreeMap<String, String>,
        with_backing: bool,
    ) -> Node {
        let under = |prefix: &str| -> BTreeMap<String, String> {
            options
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
                .collect()
        };
        let backing = under("backing.");
        let backing_strong = strong_options(backing.get("driver").map_or("qcow2", |d| d), &backing);
        Node {
            format: format.to_string(),
            protocol: options
                .get("file.driver")
                .cloned()
                .unwrap_or_else(|| "file".to_string()),
            filename: filename.to_string(),
            strong: strong_options(format, options),
            backing: (with_backing && !backing_strong.is_empty()).then(|| {
                Box::new(Node {
                    format: backing
                        .get("driver")
                        .cloned()
                        .unwrap_or_else(|| "qcow2".into()),
                    protocol: "file".into(),
                    filename: String::new(),
                    strong: backing_strong,
                    backing: None,
                })
            }),
        }
    }

    /// Whether qemu names the node by its options rather than its file.
    pub fn is_json(&self) -> bool {
        !self.strong.is_empty() || self.backing.is_some()
    }

    /// The backing node's file name, to fill in once the backing file is known.
    pub fn set_backing_filename(&mut self, name: &str) {
        if let Some(b) = &mut self.backing {
            b.filename = name.to_string();
        }
    }

    fn value(&self) -> Value {
        let mut entries: Vec<(String, Value)> = self
            .strong
            .iter()
            .map(|(k, v)| (k.clone(), Value::Str(v.clone())))
            .collect();
        entries.push(("driver".into(), Value::Str(self.format.clone())));
        entries.push((
            "file".into(),
            Value::Obj(vec![
                ("driver".into(), Value::Str(self.protocol.clone())),
                ("filename".into(), Value::Str(self.filename.clone())),
            ]),
        ));
        if let Some(b) = &self.backing {
            entries.push(("backing".into(), b.value()));
        }
        Value::Obj(entries)
    }

    /// The name qemu gives the node: its file's name, or `json:{...}`.
    pub fn name(&self) -> String {
        if !self.is_json() {
            return self.filename.clone();
        }
        let mut s = "json:".to_string();
        render(&self.value(), &mut s);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(items: &[(&str, &str)]) -> BTreeMap<String, String> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_as_qemu_prints_them() {
        let o = opts(&[("encrypt.key-secret", "s"), ("cache.direct", "on")]);
        assert_eq!(
            Node::from_options("qcow2", "t1.qcow2", &o, false).name(),
            r#"json:{"encrypt.key-secret": "s", "driver": "qcow2", "file": {"driver": "file", "filename": "t1.qcow2"}}"#
        );
        let o = opts(&[("file.locking", "off"), ("l2-cache-size", "1M")]);
        assert_eq!(
            Node::from_options("qcow2", "t.qcow2", &o, false).name(),
            "t.qcow2"
        );
        let o = opts(&[("size", "1048576"), ("offset", "0")]);
        assert_eq!(
            Node::from_options("raw", "t", &o, false).name(),
            r#"json:{"offset": "0", "driver": "raw", "size": "1048576", "file": {"driver": "file", "filename": "t"}}"#
        );
        let o = opts(&[("key-secret", "s")]);
        assert_eq!(
            Node::from_options("luks", "r.luks", &o, false).name(),
            r#"json:{"driver": "luks", "file": {"driver": "file", "filename": "r.luks"}, "key-secret": "s"}"#
        );
        let o = opts(&[
            ("encrypt.key-secret", "kt"),
            ("backing.encrypt.key-secret", "kb"),
        ]);
        let mut n = Node::from_options("qcow2", "top.qcow2", &o, true);
        n.set_backing_filename("base.qcow2");
        assert_eq!(
            n.name(),
            r#"json:{"backing": {"encrypt.key-secret": "kb", "driver": "qcow2", "file": {"driver": "file", "filename": "base.qcow2"}}, "encrypt.key-secret": "kt", "driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}}"#
        );
    }
}
