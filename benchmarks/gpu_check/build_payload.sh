#!/usr/bin/env bash
# Build the GPU check's payload .gpu/ at the repository root (git-ignored; ~30 MB):
#
#     bash benchmarks/gpu_check/build_payload.sh            # everything
#     NO_WHEELS=1 bash benchmarks/gpu_check/build_payload.sh   # for the CPU smoke run
#
# PAYLOAD_DIR: another folder than .gpu/ (the smoke run builds its own). .gpu/ holds run.sh and its helpers, proj.tar.xz (`git archive HEAD`: commit first), the
# data (make_data.py's SciFact subset, data.tar.xz), the model shapes (configs and tokenizers,
# no weights: SHAPES, default ../shared/gpu-check) and whl.tar.xz, the wheels of wheels.txt
# re-zipped uncompressed and xz'd together (28 MB instead of 40 MB of wheels).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
G=${PAYLOAD_DIR:-$REPO/.gpu}
PY=${PY:-python3}
SHAPES=${SHAPES:-$REPO/../shared/gpu-check}
DATA_SRC=${DATA_SRC:-$REPO/../shared/data/scifact}
MAKE_DATA_ARGS=${MAKE_DATA_ARGS:-}
WHEELS_CACHE=${WHEELS_CACHE:-/tmp/d2gpu-wheels}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

rm -rf "$G"
mkdir -p "$G/shapes"
cp "$HERE"/run.sh "$HERE"/build_models.py "$HERE"/env_check.py "$HERE"/collect.py "$G/"
cp -r "$SHAPES/gemma_shape" "$G/shapes/gemma"
cp -r "$SHAPES/minilm_shape" "$G/shapes/minilm"
chmod -R u+w "$G/shapes"

git -C "$REPO" archive --format=tar HEAD | xz -9 -T0 > "$G/proj.tar.xz"
DIRTY=""
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
  echo "warning: uncommitted changes are not in proj.tar.xz (it is HEAD)" >&2
  DIRTY=" (uncommitted changes left out)"
fi
echo "$(git -C "$REPO" rev-parse --short HEAD)$DIRTY" > "$G/PROJ_COMMIT"

# shellcheck disable=SC2086
"$PY" "$HERE/make_data.py" "$DATA_SRC" "$TMP/scifact" $MAKE_DATA_ARGS
tar -C "$TMP" -cJf "$G/data.tar.xz" scifact

if [ "${NO_WHEELS:-0}" != 1 ]; then
  mkdir -p "$WHEELS_CACHE" "$TMP/whl"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHEELS_CACHE" -r "$HERE/wheels.txt"
  # one file per requirement (a cache from other versions may hold more)
  "$PY" - "$HERE/wheels.txt" "$WHEELS_CACHE" "$TMP/whl" <<'PYEOF'
import re, sys, zipfile
from pathlib import Path
wanted = [l.split("==") for l in Path(sys.argv[1]).read_text().splitlines()
          if l.strip() and not l.startswith("#")]
cache, out = Path(sys.argv[2]), Path(sys.argv[3])
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
for name, version in wanted:
    found = [w for w in cache.glob("*.whl")
             if norm(w.name.split("-")[0]) == norm(name) and w.name.split("-")[1] == version]
    if len(found) != 1:
        sys.exit(f"{name}=={version}: {len(found)} wheels in {cache}")
    # stored, not deflated: xz then compresses the wheels together far better
    with zipfile.ZipFile(found[0]) as src, zipfile.ZipFile(out / found[0].name, "w",
                                                           zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename), compress_type=zipfile.ZIP_STORED)
print(f"{len(wanted)} wheels")
PYEOF
  tar -C "$TMP" -cf - whl | xz -9 -T0 > "$G/whl.tar.xz"
fi
du -sh "$G" "$G"/*.tar.xz
