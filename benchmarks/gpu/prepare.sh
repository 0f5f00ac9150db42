#!/usr/bin/env bash
# HERE (the CPU machine), in the repository root: everything the GPU machine lacks, in parts that
# travel one per device run (benchmarks/gpu/README.md):
#   - onnxruntime-gpu (CUDA 13 build) unpacked, without the TensorRT provider and the C API's
#     libonnxruntime.so (the Python module loads neither); by default its CUDA provider keeps
#     only sm_90 machine code (H100, H200: slim_fatbin.py; SLIM_ARCH= keeps every architecture),
#     then tar + xz: 255 MB -> 61 MB (195 MB with every architecture);
#   - wheels of anndata and scvi-tools with their needs (../shared/gpu/prepare_device_wheels.sh).
# Result in .payload-parts/: ort.aa, ort.ab, ... then whl.aa, ... (each at most PART_BYTES:
# by default what fits beside the working tree in one run), and their counts.
set -euo pipefail
ver=${ORT_GPU_VERSION:-1.31.1}
arch=${SLIM_ARCH-90}
here=$(cd "$(dirname "$0")" && pwd)
# a part and the working tree travel together, in at most 64 MiB (less 1 MB for the scripts)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -1 | cut -f1)
part=${PART_BYTES:-$(( 67108864 - tree - 1000000 ))}
for p in '/.payload*/' '/.whl/'; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$work" "onnxruntime-gpu==$ver"
mkdir "$work/x"
(cd "$work/x" && unzip -q "$work"/onnxruntime_gpu-*.whl \
  && rm -f onnxruntime/capi/libonnxruntime_providers_tensorrt.so onnxruntime/capi/libonnxruntime.so.*)
if [ -n "$arch" ]; then
  python3 "$here/slim_fatbin.py" "$work/x/onnxruntime/capi/libonnxruntime_providers_cuda.so" "$arch"
fi
[ -d .whl ] || bash ../shared/gpu/prepare_device_wheels.sh
rm -rf .payload-parts && mkdir .payload-parts
(cd "$work/x" && tar cf - .) | xz -9e -T0 | split -b "$part" - .payload-parts/ort.
(cd .whl && tar cf - ./*.whl) | split -b "$part" - .payload-parts/whl.
ls .payload-parts/ort.* | wc -l > .payload-parts/ort.count
ls .payload-parts/whl.* | wc -l > .payload-parts/whl.count
ls -la .payload-parts
echo "next, one device run per part, back to back: bash benchmarks/gpu/stage.sh ort.aa, then a run"
echo "carrying .payload: bash benchmarks/gpu/run.sh (benchmarks/gpu/README.md)"
