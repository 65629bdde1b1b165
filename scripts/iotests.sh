#!/usr/bin/env bash
# Runs qemu's own iotests (the ones that need no virtual machine) with vimg in place of qemu-img,
# through ../shared/tools/iotests/run.sh, with vimg started under the name qemu-img.
#
# usage: scripts/iotests.sh [WORK_DIR]     (env: ONLY="qcow2:112 raw:009", as run.sh takes it)
#
# Why the name: qemu's tests filter qemu-img's messages by their "qemu-img:" prefix (for example
# `check` on a raw image: "qemu-img: This image format does not support checks" becomes "No
# errors were found on the image."). vimg, like qemu-img, starts its messages with the name it
# was run under when that name is qemu-img (a link installed as qemu-img), else with "vimg:".
# run.sh's own wrapper execs the binary under another name, so this script hands run.sh a
# small launcher that keeps the name qemu-img (bash's exec -a).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${VIMG_SHARED:-../shared}/tools/iotests
work=${1:-${TMPDIR:-/tmp}/vimg-iotests}
cargo build --release --quiet
vimg=$(realpath "${CARGO_TARGET_DIR:-target}/release/vimg")
src=$("$shared/get-qemu-source.sh")
mkdir -p "$work"
launcher="$work/vimg-as-qemu-img"
printf '#!/usr/bin/env bash\nexec -a qemu-img %q "$@"\n' "$vimg" > "$launcher"
chmod +x "$launcher"
SKIP_BASELINE=${SKIP_BASELINE:-1} "$shared/run.sh" "$src" "$launcher" "$work"
