#!/usr/bin/env bash
# The whole GPU check in one call: install what the GPU machine lacks, run the CUDA tests, the
# GPU benchmarks and the training-step benchmark; Parquet files and log.txt go to $OUT.
#
#   benchmarks/gpu/run.sh                       # on the GPU machine (about 6 minutes on an H200)
#   benchmarks/gpu/run.sh --device cpu --n 64   # the same steps on CPU, small (the rehearsal)
#   options: --budget S (benchmark seconds; later sections are skipped past it), --no-train,
#            --sections model,stage,parts,profile,cpu,agreement (bench_gpu.py's sections to run), --no-tests
#
# The GPU machine has PyTorch 2.11 / torchvision 0.26 and no segmentation-models-pytorch,
# pydicom, polars or ray, and cannot download: wheels travel in git-ignored .whl/ (and .whl2/:
# a wheel too big for one call travels split, NAME.whl.part-aa in .whl/, NAME.whl.part-ab in
# .whl2/, over two calls; benchmarks/gpu/README.md). Ray (79 MB) does not travel: everything
# here runs without it, and a stand-in package makes any import of ray fail loudly, so the
# CPU rehearsal proves the same.
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=cuda N=2048 BUDGET=240 SIZES=32,128,256,512 REPS=10 STEPS=6 TRAIN=1 SECTIONS=model,stage,parts,profile,cpu,agreement TESTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --n) N=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --no-train) TRAIN=0; shift ;;
    --sections) SECTIONS=$2; shift 2 ;;
    --no-tests) TESTS=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ "$DEVICE" = cpu ]; then SIZES=8,16; REPS=2; STEPS=1; fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG=$OUT/log.txt
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
exec > >(tee -a "$LOG") 2>&1
echo "== $(date -u +%FT%TZ) device=$DEVICE n=$N budget=${BUDGET}s out=$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv

# 1. wheels (split ones joined), then cxrscreen itself without dependencies
SITE=$WORK/site
mkdir -p "$WORK/wheels" "$SITE"
for part in .whl/*.part-aa; do
  [ -e "$part" ] || continue
  name=$(basename "$part" .part-aa)
  cat .whl/"$name".part-* .whl2/"$name".part-* 2>/dev/null > "$WORK/wheels/$name"
done
cp .whl/*.whl "$WORK/wheels/" 2>/dev/null
if ls "$WORK"/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WORK"/wheels/*.whl \
    || { echo "FAILED: wheel install"; exit 1; }
fi
mkdir -p "$WORK/noray/ray"
echo 'raise ImportError("ray is not installed on the GPU machine (benchmarks/gpu/run.sh runs without it)")' \
  > "$WORK/noray/ray/__init__.py"
export PYTHONPATH=$WORK/noray:$SITE PYTHONUNBUFFERED=1
if $PY -m pip install -q --no-deps --no-build-isolation --no-index --no-compile --target "$WORK/cxr" . ; then
  export PYTHONPATH=$PYTHONPATH:$WORK/cxr
else
  echo "cxrscreen did not install (no setuptools?): using the source tree"
  export PYTHONPATH=$PYTHONPATH:$PWD
fi
(cd "$WORK" && $PY -c "import torch, torchvision, cxrscreen, segmentation_models_pytorch as smp, pydicom; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), 'cxrscreen from', cxrscreen.__file__)") \
  || { echo "FAILED: imports"; exit 1; }

# 2. the CUDA tests (they skip without CUDA)
export CXRSCREEN_CACHE=$WORK/cache
if [ "$TESTS" = 1 ]; then
  timeout 240 $PY -m pytest -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_gpu.py > "$OUT/pytest.txt" 2>&1
  echo "tests exit: $?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt"
fi

# 3. the GPU benchmarks (pre-decoded, JPEG bytes, parts, CPU ceiling, agreement)
DATA=.gpudata
if [ ! -d "$DATA/png" ]; then
  DATA=$WORK/data
  $PY - "$DATA" <<'EOF'
import sys
from pathlib import Path
from cxrscreen.data.synth import write_archive
out = Path(sys.argv[1])
write_archive(out / "phantoms", 48, seed=0, size=256, formats=("png", "jpeg"))
for fmt, ext in (("png", ".png"), ("jpeg", ".jpg")):
    (out / fmt).mkdir(parents=True)
    for f in sorted((out / "phantoms" / "images").rglob("*" + ext)):
        f.rename(out / fmt / f.name)
EOF
  echo "no .gpudata (benchmarks/gpu/prepare_data.py): generated phantoms"
fi
timeout $((BUDGET + 90)) $PY benchmarks/gpu/bench_gpu.py --device "$DEVICE" --data "$DATA" --out "$OUT" \
  --budget "$BUDGET" --n "$N" --batch-sizes "$SIZES" --reps "$REPS" --sections "$SECTIONS"
echo "bench exit: $?"

# 4. training steps
if [ "$TRAIN" = 1 ]; then
  timeout 120 $PY benchmarks/train_step.py --device "$DEVICE" --steps "$STEPS" --out "$OUT/train_step.parquet"
  echo "train_step exit: $?"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,memory.used --format=csv
rm -rf "$WORK"
echo "== done $(date -u +%FT%TZ)"
