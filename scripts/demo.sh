#!/usr/bin/env bash
# The main job on the shipped example: describe and verify the bundle, embed the example query
# cells (written to out/pbmc_query_latent.h5ad), and compute the three metrics; then the same
# commands on the example PEAKVI (chromatin accessibility) and its cells, and the CITE-seq TOTALVI
# (RNA + 14-29 surface proteins). No torch needed.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=models/pbmc_scvi
QUERY=models/example/pbmc_query.h5ad
mkdir -p out
set -x
scvi-onnx info "$BUNDLE"
scvi-onnx verify "$BUNDLE" --device auto
scvi-onnx latent "$BUNDLE" "$QUERY" -o out/pbmc_query_latent.h5ad --overwrite
scvi-onnx elbo "$BUNDLE" "$QUERY"
scvi-onnx reconstruction-error "$BUNDLE" "$QUERY"
scvi-onnx marginal-ll "$BUNDLE" "$QUERY" --n-mc-samples 1000
python -c "import anndata; a = anndata.read_h5ad('out/pbmc_query_latent.h5ad'); print('out/pbmc_query_latent.h5ad:', a, sep='\n')"
scvi-onnx info models/pbmc_peakvi
scvi-onnx verify models/pbmc_peakvi --device auto
scvi-onnx latent models/pbmc_peakvi models/example/pbmc_peaks.h5ad -o out/pbmc_peaks_latent.h5ad --key X_PeakVI --overwrite
scvi-onnx elbo models/pbmc_peakvi models/example/pbmc_peaks.h5ad
scvi-onnx reconstruction-error models/pbmc_peakvi models/example/pbmc_peaks.h5ad
scvi-onnx marginal-ll models/pbmc_peakvi models/example/pbmc_peaks.h5ad --n-mc-samples 1000
scvi-onnx info models/pbmc_totalvi
scvi-onnx verify models/pbmc_totalvi --device auto
scvi-onnx latent models/pbmc_totalvi models/example/pbmc_cite.h5ad -o out/pbmc_cite_latent.h5ad --key X_totalVI --overwrite
scvi-onnx elbo models/pbmc_totalvi models/example/pbmc_cite.h5ad
scvi-onnx reconstruction-error models/pbmc_totalvi models/example/pbmc_cite.h5ad
scvi-onnx marginal-ll models/pbmc_totalvi models/example/pbmc_cite.h5ad --n-mc-samples 1000
