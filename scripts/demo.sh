#!/usr/bin/env bash
# Builds vimg and runs it on the bundled sample image: info, map, check, convert to a sparse
# raw file, and compare the copy with the original. Exits non-zero if any step fails.
# Honours CARGO_TARGET_DIR; writes its output under ${TMPDIR:-/tmp} and removes it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
vimg="${CARGO_TARGET_DIR:-target}/release/vimg"
out=$(mktemp "${TMPDIR:-/tmp}/vimg-sample.XXXXXX.raw")
trap 'rm -f "$out"' EXIT
run() { echo "\$ vimg $*"; "$vimg" "$@"; echo; }
run info test-images/sample.qcow2
# The sample holds compressed clusters, which have no host offset for the human map layout
# (qemu-img map refuses them too); the JSON form lists every range.
run map --output json test-images/sample.qcow2
run check test-images/sample.qcow2
run convert -p -O raw test-images/sample.qcow2 "$out"
run map "$out"
run compare test-images/sample.qcow2 "$out"
echo "sparse copy: $(du -k --apparent-size "$out" | cut -f1) KiB apparent, $(du -k "$out" | cut -f1) KiB allocated"
echo "demo passed"
