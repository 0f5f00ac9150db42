#!/usr/bin/env bash
# ON THE GPU MACHINE, in the repository root, in every device run (carrying .payload):
#   bash benchmarks/gpu/run.sh [STEP ...]
# Keeps the carried payload part in /tmp/payload (which lasts while the machine stays warm); once
# all of onnxruntime-gpu's parts are there, installs it in /tmp/site_ort, once all the wheels'
# parts are, those in /tmp/site. Then runs the STEPs (default none): smoke (onnxruntime-gpu
# only), env tests agree bench sizes profile (everything), writing to $OUT.
set -u
OUT=${OUT:-/tmp/out}
P=/tmp/payload
mkdir -p "$OUT" "$P"
if [ -d .payload ]; then cp .payload/* "$P"/ 2>/dev/null; fi
complete() {  # all parts of $1 (ort, whl) are here
  [ -f "$P/$1.count" ] && [ "$(ls "$P/$1".?? 2>/dev/null | wc -l)" -ge "$(cat "$P/$1.count")" ]
}
if [ ! -d /tmp/site_ort/onnxruntime ] && complete ort; then
  mkdir -p /tmp/site_ort
  if command -v xz >/dev/null; then
    cat "$P"/ort.?? | xz -dc | tar xf - -C /tmp/site_ort
  else
    cat "$P"/ort.?? | python3 -c "import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('/tmp/site_ort')"
  fi && rm -f "$P"/ort.?? && echo "onnxruntime-gpu installed"
fi
if [ ! -f /tmp/site/.installed ] && complete whl; then
  mkdir -p /tmp/whl && cat "$P"/whl.?? | tar xf - -C /tmp/whl \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/whl/*.whl \
    && touch /tmp/site/.installed && rm -rf /tmp/whl "$P"/whl.?? && echo "wheels installed" \
    || echo "wheels: install FAILED"
fi
echo "payload: $(ls "$P" | tr '\n' ' ')"
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
    smoke)  # onnxruntime-gpu alone (before the wheels arrive): the shipped graphs on CUDA
      step smoke
      timeout 120 python3 benchmarks/gpu_probe.py smoke -o "$OUT/smoke.json"
      ;;
    env)
      step env
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      python3 -c "import onnxruntime as o, numpy, anndata, scvi_onnx; print('onnxruntime', o.__version__, o.get_available_providers(), 'numpy', numpy.__version__, 'anndata', anndata.__version__, 'scvi_onnx', scvi_onnx.__version__)"
      ;;
    tests)
      step tests
      timeout 120 python3 -m pytest -p no:cacheprovider -m gpu tests/runtime -q -rA \
        --continue-on-collection-errors 2>&1 | tail -40
      ;;
    agree)
      step agree
      timeout 120 python3 benchmarks/gpu_probe.py agree -o "$OUT/agree.json"
      ;;
    bench)
      step bench
      timeout 420 python3 benchmarks/run.py --device cuda --models ${BENCH_MODELS:-pbmc_zinb} --n-cells "$N_CELLS" \
        --mll-cells 1024 --mll-repeats 2 --scvi-per-pass 1 100 1000 --work "$W" --out "$OUT"
      ;;
    sizes)
      step sizes
      timeout 120 python3 benchmarks/gpu_probe.py sizes -o "$OUT/sizes.json"
      ;;
    profile)
      step profile
      [ -f "$W/pbmc_zinb_$N_CELLS.h5ad" ] || python3 benchmarks/make_data.py --n-cells "$N_CELLS" -o "$W/pbmc_zinb_$N_CELLS.h5ad"
      timeout 360 python3 benchmarks/gpu_probe.py profile --data "$W/pbmc_zinb_$N_CELLS.h5ad" -o "$OUT/profile.json"
      ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "=== done ($(date +%T))"
