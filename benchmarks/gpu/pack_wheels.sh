#!/usr/bin/env bash
# Fetch (here, where pip can download) the wheels the GPU machine lacks into git-ignored .whl/,
# splitting any wheel too big to travel in one call: NAME.part-aa stays in .whl/, NAME.part-ab
# goes to .whl2/. Then the device calls are: (1) carry .whl (any short command), (2) at once,
# on the still-warm machine, carry .whl2 and .gpudata and run benchmarks/gpu/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
rm -rf .whl .whl2 && mkdir -p .whl .whl2
PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS="$PLATFORMS --platform $p"
done
# what the GPU image lacks among cxrscreen's dependencies, at the versions pyproject.toml allows
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d .whl \
  segmentation-models-pytorch==0.6.0 pydicom==3.0.2 polars==2.1.0 polars-runtime-32==2.1.0
LIMIT=27000000  # the tracked tree is ~24 MB of the 64 MiB a call may carry
for w in .whl/*.whl; do
  if [ "$(stat -c %s "$w")" -gt "$LIMIT" ]; then
    split -b "$LIMIT" -a 2 "$w" "$w.part-"
    mv "$w.part-ab" .whl2/ && rm "$w"
    [ ! -e "$w.part-ac" ] || { echo "$w needs more than two parts" >&2; exit 1; }
  fi
done
du -sh .whl .whl2
