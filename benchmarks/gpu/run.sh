#!/usr/bin/env bash
# ON THE GPU MACHINE, in the repository root, in every device run (carrying .payload):
#   bash benchmarks/gpu/run.sh [STEP ...]
# Keeps the carried payload part in /tmp/payload (which lasts while the machine stays warm); once
# all parts are there, installs onnxruntime-gpu in /tmp/site_ort and the wheels in /tmp/site. Then
# runs the STEPs (default none): env tests agree bench sizes profile, writing to $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/payload
P=/tmp/payload
if [ -d .payload ]; then cp .payload/part.* .payload/count "$P"/ 2>/dev/null; fi
if [ ! -d /tmp/site_ort/onnxruntime ]; then
  have=$(ls "$P"/part.* 2>/dev/null | wc -l)
  need=$(cat "$P"/count 2>/dev/null || echo 999)
  echo "payload parts: $have of $need"
  [ "$have" -lt "$need" ] && exit 0
  t=$(date +%s)
  mkdir -p /tmp/unpacked /tmp/site_ort
  cat "$P"/part.* | tar xf - -C /tmp/unpacked && rm -f "$P"/part.*
  if command -v xz >/dev/null; then
    xz -dc -T0 /tmp/unpacked/ort.tar.xz | tar xf - -C /tmp/site_ort
  else
    python3 -c "import tarfile; tarfile.open('/tmp/unpacked/ort.tar.xz').extractall('/tmp/site_ort')"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/unpacked/whl/*.whl
  rm -rf /tmp/unpacked
  echo "installed in $(( $(date +%s) - t )) s"
fi
# the project from this tree (scvi_onnx = runtime/); the CUDA 13 libraries of the torch image
mkdir -p /tmp/proj && ln -sfn "$PWD/runtime" /tmp/proj/scvi_onnx
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$(ls -d $NV/*/lib 2>/dev/null | tr '\n' ':')/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/proj:/tmp/site_ort:/tmp/site
export PYTHONUNBUFFERED=1
W=/tmp/work
N_CELLS=${N_CELLS:-200000}
step() { echo; echo "=== $1 ($(date +%T))"; }
for s in "$@"; do
  case $s in
    env)
      step env
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      python3 -c "import onnxruntime as o, numpy, anndata, scvi_onnx; print('onnxruntime', o.__version__, o.get_available_providers(), 'numpy', numpy.__version__, 'anndata', anndata.__version__, 'scvi_onnx', scvi_onnx.__version__)"
      ;;
    tests)
      step tests
      timeout 300 python3 -m pytest -p no:cacheprovider -m gpu tests/runtime -q -rA \
        --continue-on-collection-errors 2>&1 | tail -40
      ;;
    agree)
      step agree
      timeout 240 python3 benchmarks/gpu_probe.py agree -o "$OUT/agree.json"
      ;;
    bench)
      step bench
      timeout 400 python3 benchmarks/run.py --device cuda --models pbmc_zinb --n-cells "$N_CELLS" \
        --mll-cells 1024 --mll-repeats 2 --scvi-per-pass 1 100 1000 --work "$W" --out "$OUT"
      ;;
    sizes)
      step sizes
      timeout 150 python3 benchmarks/gpu_probe.py sizes -o "$OUT/sizes.json"
      ;;
    profile)
      step profile
      [ -f "$W/pbmc_zinb_$N_CELLS.h5ad" ] || python3 benchmarks/make_data.py --n-cells "$N_CELLS" -o "$W/pbmc_zinb_$N_CELLS.h5ad"
      timeout 240 python3 benchmarks/gpu_probe.py profile --data "$W/pbmc_zinb_$N_CELLS.h5ad" -o "$OUT/profile.json"
      ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "=== done ($(date +%T))"
