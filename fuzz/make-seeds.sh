#!/usr/bin/env bash
# make-seeds.sh: rebuild the seed corpora under fuzz/corpus/<target>/ from test-images/.
#
# Seeds are the qcow2 files of test-images/ (gzip-compressed ones unpacked) of at most 64 KiB,
# and every image of the corruption corpus test-images/corrupt/. The header target gets only
# their first 4 KiB. The VMA reader (vma_read) gets the VMA archives of test-images/. Files are named seed-<source name>, so that a seed says where it came from
# (libFuzzer names the inputs it finds by their SHA-1; those are not committed: fuzz into a
# scratch directory, see README.md). Crash files live apart, in fuzz/artifacts/<target>/.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGES="$HERE/../test-images"
TARGETS=(qcow2_open_read qcow2_header qcow2_check qcow2_repair)
for t in "${TARGETS[@]}"; do
    rm -rf "$HERE/corpus/$t"
    mkdir -p "$HERE/corpus/$t"
done
add() { # add NAME FILE: FILE's bytes as seed-NAME in every target's corpus
    local name=$1 file=$2
    [ "$(head -c 4 "$file" | od -An -tx1 | tr -d ' ')" = "514649fb" ] || return 0
    [ "$(stat -c %s "$file")" -le 65536 ] || return 0
    for t in "${TARGETS[@]}"; do
        if [ "$t" = qcow2_header ]; then
            head -c 4096 "$file" > "$HERE/corpus/$t/seed-$name"
        else
            cp "$file" "$HERE/corpus/$t/seed-$name"
        fi
    done
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in "$IMAGES"/*.qcow2 "$IMAGES"/*.qcow2.gz "$IMAGES"/corrupt/*.qcow2; do
    name=$(basename "$f" .gz)
    case "$f" in
        */corrupt/*) name="corrupt-$name" ;;
    esac
    if [ "${f%.gz}" != "$f" ]; then
        gzip -dc "$f" > "$tmp/$name"
        add "$name" "$tmp/$name"
    else
        add "$name" "$f"
    fi
done
# The VMA reader's seeds: the VMA fixtures (whole, and their first 16 KiB: the headers).
rm -rf "$HERE/corpus/vma_read"
mkdir -p "$HERE/corpus/vma_read"
for f in "$IMAGES"/*.vma; do
    [ -e "$f" ] || continue
    name=$(basename "$f")
    cp "$f" "$HERE/corpus/vma_read/seed-$name"
    head -c 16384 "$f" > "$HERE/corpus/vma_read/seed-head-$name"
done
for t in "${TARGETS[@]}" vma_read; do
    echo "$t: $(ls "$HERE/corpus/$t" | wc -l) seeds, $(du -sk "$HERE/corpus/$t" | cut -f1) KiB"
done
