"""Folders that older scvi-tools versions saved themselves, exported and compared with the
numbers those versions computed.

``tests/data/old_versions/<version>/`` holds a small TOTALVI (real CITE-seq cells: 100 genes,
29 antibodies, 15 of them missing in one batch), PEAKVI (300 regions), SCVI (learned library
size, per-batch dispersion), LinearSCVI and SCANVI (100 genes) that each scvi-tools version
there trained and saved (``scripts/save_old_version_folders.py``,
run in a virtual environment of each version), with that version's latent mean, posterior
mean and variance, and its ELBO under ten torch seeds.

What they show (README, "Exporting models saved by older scvi-tools"):
- the latent of every folder equals the saving version's own;
- scvi-tools 1.3.1 divides TOTALVI's encoder input by ``1 + its mean`` and 1.4.2 does so for
  models trained before, too: its latent for them is not theirs. The default export reproduces
  the version that trained the model; ``reproduce="installed"`` gives 1.4.2's numbers;
- ELBOs are scvi-tools 1.4.2's: TOTALVI's gained the per-batch protein efficiency and its
  penalty in 1.3.1 too (``-log LogNormal(1; 0, 1)`` per protein for models without
  efficiencies), and scvi-tools < 1.0 placed masked protein losses with ``masked_scatter_``
  (values of other entries).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from ..conftest import require

torch = require("torch")
scvi = require("scvi")
ad = require("anndata")
require("onnx")

import scvi_onnx  # noqa: E402
from scvi_onnx.exporter import export_model  # noqa: E402
from scvi_onnx.exporter.inspect import version_before  # noqa: E402
from scvi_onnx.exporter.legacy import load_saved_model  # noqa: E402

OLD = Path(__file__).resolve().parents[1] / "data" / "old_versions"
VERSIONS = sorted(p.name for p in OLD.iterdir() if p.is_dir())
N_SEEDS = 10
#: -log LogNormal(1; 0, 1): TOTALVAE's efficiency penalty per protein at efficiency 1 (1.2+)
EFFICIENCY_PENALTY = 0.5 * math.log(2 * math.pi)


def read_cells(version: str, kind: str):
    """The cells a folder was trained on: its ``adata.h5ad``, or (scvi-tools < 0.15 TOTALVI,
    whose setup dictionary anndata cannot write) ``<kind>.h5ad`` beside it."""
    file = OLD / version / kind / "adata.h5ad"
    return ad.read_h5ad(file if file.is_file() else OLD / version / f"{kind}.h5ad")


def test_the_versions_are_there():
    assert VERSIONS == ["0.14.6", "0.16.4", "0.20.3", "1.1.6.post2", "1.3.0", "1.3.3"]


KINDS = ("totalvi", "peakvi", "scvi", "linearscvi", "scanvi")


@pytest.fixture(
    scope="module",
    params=[(v, k) for v in VERSIONS for k in KINDS if (OLD / v / k).is_dir()],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def exported(request, tmp_path_factory):
    version, kind = request.param
    folder = OLD / version / kind
    ref = np.load(OLD / version / "reference.npz")
    assert str(ref["version"]) == version
    bundle = export_model(folder, tmp_path_factory.mktemp(f"{version}-{kind}") / "b")
    adata = read_cells(version, kind)
    return (
        version,
        kind,
        folder,
        {k.removeprefix(f"{kind}_"): ref[k] for k in ref.files if k.startswith(kind)},
        bundle,
        adata,
    )


def test_latent_equals_the_saving_versions_own(exported):
    version, kind, folder, ref, bundle, adata = exported
    om = scvi_onnx.load(bundle, device="cpu")
    assert om.manifest.extra["provenance"]["trained_with"] == f"scvi-tools {version}"
    if kind == "totalvi":
        assert om.config.encoder_input_scaling is (not version_before(version, "1.3.1"))
    np.testing.assert_allclose(om.get_latent_representation(adata), ref["latent"], atol=1e-5)
    if "qz_m" in ref:  # return_dist exists since scvi-tools 0.20
        m, v = om.get_latent_representation(adata, return_dist=True)
        np.testing.assert_allclose(m, ref["qz_m"], atol=1e-5)
        np.testing.assert_allclose(v, ref["qz_v"], atol=1e-5, rtol=1e-5)
    assert scvi_onnx.verify(bundle).ok


def test_elbo_within_the_saving_versions_spread(exported):
    version, kind, folder, ref, bundle, adata = exported
    if kind == "totalvi" and version_before(version, "1.0"):
        pytest.skip("scvi-tools < 1.0 scattered masked protein losses to other entries")
    om = scvi_onnx.load(bundle, device="cpu")
    ours = np.array([om.get_elbo(adata, seed=s) for s in range(N_SEEDS)])
    theirs = ref["elbo"]
    shift = 0.0
    if kind == "totalvi" and version_before(version, "1.3.1"):
        # 1.3.1 added the efficiency penalty (and a 1e-3-weighted mixing term, ~0.02 here)
        shift = -om.config.n_proteins * EFFICIENCY_PENALTY
    se = math.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
    diff = ours.mean() - theirs.mean() - shift
    assert abs(diff) < 4 * se + 0.05, (ours.mean(), theirs.mean(), shift, se)


@pytest.mark.parametrize("version", VERSIONS)
def test_reproduce_installed_gives_scvi_tools_1_4_2s_numbers(version, tmp_path):
    """What scvi-tools 1.4.2 computes on the same weights: its own ``TOTALVI.load`` for
    folders from 1.3.1 on; older ones it cannot load (no ``log_per_batch_efficiency``), so
    with the zeros its ``convert_legacy_save`` fills in (the exporter's loader). For models
    trained before 1.3.1 that is another latent than theirs (1.4.2 scales the input the
    weights never saw scaled): reproduce="installed" gives it, the default theirs."""
    folder = OLD / version / "totalvi"
    adata = read_cells(version, "totalvi")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if version_before(version, "1.3.1"):
            model = load_saved_model(folder, adata.copy())
        else:
            model = scvi.model.TOTALVI.load(str(folder), adata=adata.copy(), accelerator="cpu")
    want = model.get_latent_representation(adata.copy())
    installed = scvi_onnx.load(export_model(folder, tmp_path / "i", reproduce="installed"))
    assert installed.config.encoder_input_scaling
    np.testing.assert_allclose(installed.get_latent_representation(adata), want, atol=1e-5)
    own = np.load(OLD / version / "reference.npz")["totalvi_latent"]
    gap = np.abs(want - own).max()
    if version_before(version, "1.3.1"):
        assert gap > 0.05
    else:
        assert gap < 1e-5


def test_reproduce_is_checked(tmp_path):
    from scvi_onnx.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="reproduce='latest'.*trained.*installed"):
        export_model(OLD / VERSIONS[0] / "peakvi", tmp_path / "b", reproduce="latest")
