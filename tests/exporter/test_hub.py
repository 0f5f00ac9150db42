"""Model folders laid out as scvi-tools' ``HubModel`` writes them export directly, and the
bundle keeps their provenance (hub metadata and model card) for ``scvi-onnx info``."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest

from ..conftest import require

torch = require("torch")
scvi = require("scvi")

import scvi_onnx  # noqa: E402
from scvi_onnx import bundle as B  # noqa: E402
from scvi_onnx.cli import main  # noqa: E402
from scvi_onnx.exporter import export_model  # noqa: E402

from ..conftest import EXAMPLE_H5AD, MODELS  # noqa: E402

CARD = """\
---
library_name: scvi-tools
license: cc-by-4.0
tags:
- biology
- genomics
- single-cell
- model_cls_name:SCVI
- scvi_version:1.4.2
- anndata_version:0.12.19
- modality:rna
- tissue:blood
- annotated:False
---

ScVI is a variational inference model for single-cell RNA-seq data that can learn an underlying
latent space, integrate technical batches and impute dropouts.

# Model Description

scVI on two 10x Genomics PBMC samples (pbmc_5k, pbmc_10k), 2,000 genes.

# Model Properties

<details>
<summary><strong>Training</strong></summary>

**Training data url**: https://cellxgene.cziscience.com/e/pbmc-example.cxg/

**Training Code URL**: https://example.org/train_pbmc_scvi.py

</details>

# References

Lopez, R., Regier, J., Cole, M.B. et al. Deep generative modeling for single-cell
transcriptomics. Nat Methods 15, 1053-1058 (2018).
"""
METADATA = {
    "scvi_version": "1.4.2",
    "anndata_version": "0.12.19",
    "model_cls_name": "SCVI",
    "training_data_url": "https://cellxgene.cziscience.com/e/pbmc-example.cxg/",
    "model_parent_module": "scvi.model",
}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """The shipped model's folder in the hub layout: model.pt, adata.h5ad, metadata, card."""
    d = tmp_path_factory.mktemp("hub") / "pbmc-scvi"
    shutil.copytree(MODELS / "pbmc_scvi_torch", d)
    q = ad.read_h5ad(EXAMPLE_H5AD)
    om = scvi_onnx.load(MODELS / "pbmc_scvi", device="cpu")
    q[:, list(om.genes)].copy().write_h5ad(d / "adata.h5ad")
    (d / "_scvi_required_metadata.json").write_text(json.dumps(METADATA))
    (d / "README.md").write_text(CARD)
    return d


def test_hub_folder_exports_with_its_provenance(hub_folder, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", str(hub_folder), str(out)]) == 0
    capsys.readouterr()
    om = scvi_onnx.load(out, device="cpu")
    prov = om.manifest.extra["provenance"]
    assert prov["layout"] == "scvi-tools model hub"
    assert prov["hub_metadata"] == METADATA
    assert prov["license"] == "cc-by-4.0"
    assert prov["training_data_url"] == METADATA["training_data_url"]
    assert prov["training_code_url"] == "https://example.org/train_pbmc_scvi.py"
    assert prov["trained_with"] == "scvi-tools 1.4.2, anndata 0.12.19"
    assert "Deep generative modeling" in prov["citation"]
    assert prov["model_card"] == CARD
    assert "tissue:blood" in prov["model_card_metadata"]["tags"]
    # the same numbers as the model (the real cells of adata.h5ad are among the probes)
    shipped = scvi_onnx.load(MODELS / "pbmc_scvi", device="cpu")
    q = ad.read_h5ad(EXAMPLE_H5AD)
    np.testing.assert_array_equal(
        om.get_latent_representation(q), shipped.get_latent_representation(q)
    )
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in (
        "license:",
        "cc-by-4.0",
        "training data:",
        "pbmc-example.cxg",
        "trained with:           scvi-tools 1.4.2, anndata 0.12.19",
        "citation:",
        "Nat Methods",
    ):
        assert needle in text, needle
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["license"] == "cc-by-4.0"


def test_plain_folder_and_in_memory_model_record_their_source(tmp_path):
    b = export_model(str(MODELS / "pbmc_scvi_torch"), tmp_path / "b1")
    prov = scvi_onnx.load(b, device="cpu").manifest.extra["provenance"]
    assert prov["source"].endswith("pbmc_scvi_torch") and prov["trained_with"].startswith(
        "scvi-tools "
    )
    assert "model_card" not in prov
    # where it came from, whatever folder `info` runs in, and which weights exactly
    assert prov["source"] == str(MODELS / "pbmc_scvi_torch")  # as given: no machine's path
    assert prov["source_sha256"] == {
        "model.pt": B.sha256_file(MODELS / "pbmc_scvi_torch" / "model.pt")
    }


def test_malformed_model_card_header_is_kept_as_text(hub_folder, tmp_path):
    d = tmp_path / "bad_card"
    shutil.copytree(hub_folder, d)
    (d / "README.md").write_text("---\nlicense: [unclosed\n---\n# References\nX et al.\n")
    b = export_model(str(d), tmp_path / "b")
    prov = scvi_onnx.load(b, device="cpu").manifest.extra["provenance"]
    assert "license" not in prov and prov["citation"] == "X et al."
    assert prov["model_card"].startswith("---\nlicense: [unclosed")
