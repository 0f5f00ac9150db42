#!/usr/bin/env bash
# HERE (the CPU machine), in the repository root: everything the GPU machine lacks, in parts that
# travel one per device run (benchmarks/gpu/README.md).
#   - onnxruntime-gpu (CUDA 13 build) unpacked, without the TensorRT provider and the C API's
#     libonnxruntime.so (the Python module needs neither), tar + xz: 255 -> 195 MB;
#   - wheels of anndata and scvi-tools with their needs (../shared/gpu/prepare_device_wheels.sh).
# Result: .payload-parts/part.aa, .ab, ... of PART_BYTES each (default: what fits beside the
# working tree in one run) and .payload-parts/count.
# ORT_TAR=path reuses an xz tarball built before (the compression takes ~2.5 min on 2 cores).
set -euo pipefail
ver=${ORT_GPU_VERSION:-1.31.1}
# a part and the working tree travel together, in at most 64 MiB (less 1 MB for the scripts)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -1 | cut -f1)
part=${PART_BYTES:-$(( 67108864 - tree - 1000000 ))}
for p in '/.payload*/' '/.whl/'; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/payload/whl"
if [ -n "${ORT_TAR:-}" ]; then
  cp "$ORT_TAR" "$work/payload/ort.tar.xz"
else
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$work" "onnxruntime-gpu==$ver"
  mkdir "$work/x"
  (cd "$work/x" && unzip -q "$work"/onnxruntime_gpu-*.whl \
    && rm -f onnxruntime/capi/libonnxruntime_providers_tensorrt.so onnxruntime/capi/libonnxruntime.so.* \
    && tar cf - . | xz -9e -T0 > "$work/payload/ort.tar.xz")
fi
[ -d .whl ] || bash ../shared/gpu/prepare_device_wheels.sh
cp .whl/*.whl "$work/payload/whl/"
rm -rf .payload-parts && mkdir .payload-parts
(cd "$work/payload" && tar cf - .) | split -b "$part" - .payload-parts/part.
ls .payload-parts/part.* | wc -l > .payload-parts/count
ls -la .payload-parts
echo "next: bash benchmarks/gpu/stage.sh aa, then a device run carrying .payload: bash benchmarks/gpu/run.sh"
