#!/usr/bin/env bash
# Builds vimg and runs it on the bundled sample image: info, map, check, convert to a sparse
# raw file, and compare the copy with the original.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
out=${TMPDIR:-/tmp}/vimg-sample.raw
run() { echo "\$ vimg $*"; ./target/release/vimg "$@"; echo; }
run info test-images/sample.qcow2
run map test-images/sample.qcow2
run check test-images/sample.qcow2
run convert -p -O raw test-images/sample.qcow2 "$out"
run compare test-images/sample.qcow2 "$out"
echo "sparse copy: $(du -k --apparent-size "$out" | cut -f1) KiB apparent, $(du -k "$out" | cut -f1) KiB allocated"
