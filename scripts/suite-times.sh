#!/usr/bin/env bash
# Clean-clone build and test times of two revisions, one after the other (the structure issue
# asks for the suite's times before and after, in the same hour).
#
# usage: scripts/suite-times.sh OLD_REV [NEW_REV] [WORK_DIR]   (NEW_REV defaults to HEAD)
#
# Each revision is cloned afresh into WORK_DIR (default /tmp/suite-times), built with
# `cargo build --release --tests --locked` (dependencies included) and tested with
# `cargo test --release --locked` under VIMG_REQUIRE_QEMU=1; prints the seconds of each step.
# Run it on a quiet machine, and not from a shell that ignores SIGINT (`cmd &` without job
# control): the interrupt tests need to signal vimg.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
old=${1:?old revision}; new=${2:-HEAD}; T=${3:-/tmp/suite-times}
rm -rf "$T"; mkdir -p "$T"
for v in old new; do
  rev=$old; [ $v = new ] && rev=$new
  git clone -q "$here" "$T/$v" && (cd "$T/$v" && git checkout -q "$rev")
  cd "$T/$v"
  export CARGO_TARGET_DIR=$T/$v/target
  s=$(date +%s.%N)
  cargo build --release --tests --locked > "$T/$v.build.log" 2>&1
  b=$(date +%s.%N)
  VIMG_REQUIRE_QEMU=1 PROPTEST_RNG_SEED=20261121 cargo test --release --locked > "$T/$v.test.log" 2>&1; rc=$?
  e=$(date +%s.%N)
  bins=$(grep -c '^     Running' "$T/$v.test.log")
  printf '%s (%s): build %.0f s, test run %.0f s (exit %s, %s test binaries)\n' \
    $v "$(git log --oneline -1 | cut -c1-60)" "$(echo "$b-$s" | bc)" "$(echo "$e-$b" | bc)" $rc "$bins"
done
