//! JSON output laid out as qemu-img lays it out, so that `vimg ... --output json` can be diffed
//! against qemu-img's.
//!
//! qemu-img pretty-prints with four-space indentation, puts the closing bracket of an empty
//! array or object on its own line, and emits object members in the order of its internal hash
//! table, which depends only on the key. [`KEY_ORDER`] records that order for every key vimg
//! emits (observed from qemu-img's output); keys not listed follow, alphabetically.

use serde_json::Value;
use std::fmt::Write;

/// The order in which qemu-img emits object keys, as observed in its `info` and `check` output.
/// Any two keys that can share an object appear here in qemu-img's relative order.
pub const KEY_ORDER: &[&str] = &[
    // `check` and `info` objects (they share "filename" and "format").
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "children",
    "backing-filename-format",
    "snapshots",
    "compressed",
    "virtual-size",
    "filename",
    "cluster-size",
    // The first LUKS header keys (see below): qcow2's `encrypt` puts "format" among them.
    "ivgen-alg",
    "detached-header",
    "hash-alg",
    "cipher-alg",
    "uuid",
    "ivgen-hash-alg",
    "format",
    "actual-size",
    "format-specific",
    "full-backing-filename",
    "encrypted",
    "backing-filename",
    "dirty-flag",
    "fragmented-clusters",
    // Snapshots, bitmaps and child entries (they share "name").
    "icount",
    "vm-clock-nsec",
    "flags",
    "name",
    "info",
    "date-sec",
    "date-nsec",
    "vm-clock-sec",
    "id",
    "vm-state-size",
    "granularity",
    // The format-specific wrapper.
    "type",
    "data",
    // qcow2 format-specific data.
    "compat",
    "compression-type",
    "lazy-refcounts",
    "bitmaps",
    "refcount-bits",
    "data-file",
    "data-file-raw",
    "encrypt",
    "corrupt",
    "extended-l2",
    // vmdk format-specific data.
    "cid",
    "parent-cid",
    "create-type",
    "extents",
    // LUKS header data (raw LUKS format-specific data, qcow2's `encrypt`) and its key slots.
    "cipher-mode",
    "slots",
    "payload-offset",
    "master-key-iters",
    "active",
    "iters",
    "key-offset",
    "stripes",
];

/// The members of `map` in qemu-img's order (see [`KEY_ORDER`]).
pub fn ordered(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let rank = |k: &str| {
        KEY_ORDER
            .iter()
            .position(|o| *o == k)
            .unwrap_or(KEY_ORDER.len())
    };
    let mut members: Vec<_> = map.iter().collect();
    // Stable sort: unknown keys keep the map's (alphabetical) order after the known ones.
    members.sort_by_key(|(k, _)| rank(k));
    members
}

/// Renders `value` as qemu-img pretty-prints JSON (no trailing newline).
pub fn to_qemu_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in ordered(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                let _ = write!(out, "{}: ", Value::String(k.clone()));
                write_value(out, v, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_value(out, v, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push(']');
        }
        scalar => {
            let _ = write!(out, "{scalar}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lays_out_like_qemu() {
        let v = serde_json::json!({
            "format": "file",
            "children": [],
            "virtual-size": 5,
            "format-specific": {"type": "file", "data": {}},
        });
        assert_eq!(
            to_qemu_json(&v),
            "{\n    \"children\": [\n    ],\n    \"virtual-size\": 5,\n    \"format\": \"file\",\n    \
             \"format-specific\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    }\n}"
        );
    }
}
