"""Shared fixtures and helpers: paths, the torch-free switch, real PBMC cells, the tiny trained
scvi-tools models (trained once per session), and the noise patch that feeds scvi-tools the
runtime's Monte-Carlo draws.

torch, scvi-tools and onnx are imported lazily (inside fixtures and helpers), so the torch-free
tests (``tests/runtime``) collect and run in an environment without them. See tests/README.md
for ``SCVI_ONNX_TORCH_FREE``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SHIPPED_BUNDLE = MODELS / "pbmc_scvi"
#: The scvi-tools model the shipped bundle was exported from (scripts/train_example_model.py).
SHIPPED_TORCH = MODELS / "pbmc_scvi_torch"
EXAMPLE_H5AD = MODELS / "example" / "pbmc_query.h5ad"
TRAIN_H5AD = MODELS / "example" / "pbmc_train.h5ad"
#: Small recorded test data (outside the bundle folder, whose manifest lists its files).
TEST_DATA = Path(__file__).resolve().parent / "data"
#: scvi-tools' per-cell values for the shipped bundle (scripts/record_shipped_reference.py).
SHIPPED_REFERENCE = TEST_DATA / "shipped_reference.npz"

# ---------------------------------------------------------------------------------------------
# torch-free switch
# ---------------------------------------------------------------------------------------------
#: Set (to anything but "" or "0") for the torch-free run: see tests/README.md.
TORCH_FREE_ENV = "SCVI_ONNX_TORCH_FREE"
TORCH_FREE = os.environ.get(TORCH_FREE_ENV, "").strip() not in ("", "0")
#: What the export and test extras bring and the runtime must never need.
TORCH_STACK = ("torch", "scvi", "lightning", "pytorch_lightning", "onnx")
INSTALL_HINT = "pip install -c constraints.txt -e '.[cpu,export,test]'"


class _BlockTorchStack(importlib.abc.MetaPathFinder):
    """In the torch-free run, importing torch / scvi-tools / onnx fails as if not installed, so
    that run proves the torch-free tests need none of them even where they are installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in TORCH_STACK:
            raise ModuleNotFoundError(
                f"No module named {name!r} ({TORCH_FREE_ENV} is set: the torch-free run "
                "blocks torch, scvi-tools and onnx)",
                name=name,
            )
        return None


if TORCH_FREE:
    sys.meta_path.insert(0, _BlockTorchStack())


def require(name: str) -> ModuleType:
    """Import ``name`` (torch, scvi, onnx, or an optional extra's module) for a test that needs
    it.

    In the test environment a missing module is an error, never a skip: tests that compare
    with scvi-tools are the only ones that see some wrong numbers, and a silent skip hid them.
    In the torch-free run (``SCVI_ONNX_TORCH_FREE=1``) a test that needs the torch stack is
    skipped instead (the extras' modules are still required). Works at
    module level (collection) and inside tests and fixtures.
    """
    __tracebackhide__ = True  # a skip or error is reported at the test that needs ``name``
    if TORCH_FREE and name.split(".")[0] in TORCH_STACK:
        pytest.skip(f"needs {name}: {TORCH_FREE_ENV} is set", allow_module_level=True)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"{name} is not importable ({e}); tests fail rather than skip where the test "
            f"environment lacks what they need: install the extras ({INSTALL_HINT})"
            f" or, to run only the torch-free tests, set {TORCH_FREE_ENV}=1"
        ) from e


def pytest_configure(config):
    warnings.filterwarnings("ignore", module="lightning")
    if TORCH_FREE:
        early = sorted(m for m in sys.modules if m.partition(".")[0] in TORCH_STACK)
        if early:
            raise pytest.UsageError(f"{TORCH_FREE_ENV} is set but {early} were imported already")


def pytest_report_header(config):
    if TORCH_FREE:
        return (
            f"scvi-onnx: torch-free run ({TORCH_FREE_ENV} set): torch, scvi-tools and onnx are "
            "blocked; tests that need them are skipped"
        )
    return (
        "scvi-onnx: full run: tests that need torch, scvi-tools or onnx fail if one is missing "
        f"(set {TORCH_FREE_ENV}=1 for the torch-free subset)"
    )


# ---------------------------------------------------------------------------------------------
# real PBMC cells
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pbmc_small():
    """400 real PBMC cells (two batches) x 150 genes, with extra obs columns for the configs."""
    import anndata as ad

    a = ad.read_h5ad(TRAIN_H5AD)
    a = a[:, :150].copy()
    rng = np.random.default_rng(0)
    n = a.n_obs
    a.obs["cell_type"] = np.array(["T", "B", "NK"])[rng.integers(0, 3, n)]
    a.obs["donor"] = np.array(["d1", "d2", "d3", "d4"])[rng.integers(0, 4, n)]
    a.obs["single"] = "only"  # a categorical covariate with one category (dropped by FCLayers)
    a.obs["many"] = [f"b{i}" for i in rng.integers(0, 12, n)]
    a.obs["pct"] = rng.normal(size=n).astype(np.float32)
    a.obs["depth"] = rng.uniform(size=n).astype(np.float32)
    tot = np.asarray(a.X.sum(1)).ravel()
    a.obs["sf"] = (tot / np.median(tot)).astype(np.float32)
    a.layers["counts"] = a.X.copy()
    return a


@pytest.fixture(scope="session")
def tiny_cells(pbmc_small):
    """``pbmc_small`` plus ``ct_unk``: ``cell_type`` with 30% of the cells "Unknown" (SCANVI's
    unlabeled category)."""
    a = pbmc_small.copy()
    lab = a.obs["cell_type"].astype(str).to_numpy().copy()
    lab[np.random.default_rng(1).random(a.n_obs) < 0.3] = "Unknown"
    a.obs["ct_unk"] = lab
    return a


# ---------------------------------------------------------------------------------------------
# tiny trained models
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiny:
    """How to train one tiny scvi-tools model on ``tiny_cells``.

    ``cls``: "SCVI", "LinearSCVI" or "SCANVI"; ``setup``: ``setup_anndata`` arguments;
    ``model``: model arguments over ``size``; ``from_scvi``: a SCANVI made from an SCVI trained
    first (for ``epochs`` too) with ``scvi.model.SCANVI.from_scvi_model``.
    """

    cls: str
    setup: dict
    model: dict = field(default_factory=dict)
    epochs: int = 3
    size: dict = field(default_factory=lambda: dict(n_hidden=16, n_latent=5))
    from_scvi: bool = False


_LS = dict(n_hidden=16, n_latent=4)  # LinearSCVI and SCANVI

#: The SCVI configuration matrix of tests/parity/test_scvi.py.
SCVI_CONFIGS = {
    "zinb-default-2batch": Tiny("SCVI", dict(batch_key="batch")),
    "nb-genebatch-learnedlib-2layers": Tiny(
        "SCVI",
        dict(batch_key="batch", labels_key="cell_type", layer="counts"),
        dict(
            gene_likelihood="nb", dispersion="gene-batch", n_layers=2, use_observed_lib_size=False
        ),
    ),
    "poisson-ln-layernorm-3layers-shallow": Tiny(
        "SCVI",
        dict(batch_key="batch"),
        dict(
            gene_likelihood="poisson",
            latent_distribution="ln",
            n_layers=3,
            use_batch_norm="none",
            use_layer_norm="both",
            deeply_inject_covariates=False,
        ),
    ),
    # scvi-tools accepts a dispersion for Poisson and ignores it: the scoring graph takes no
    # labels (the export failed on its graph IO before)
    "poisson-genelabel-ignored": Tiny(
        "SCVI",
        dict(batch_key="batch", labels_key="cell_type"),
        dict(gene_likelihood="poisson", dispersion="gene-label"),
    ),
    "normal-genelabel-nolog": Tiny(
        "SCVI",
        dict(labels_key="cell_type"),
        dict(gene_likelihood="normal", dispersion="gene-label", log_variational=False),
    ),
    "zinb-genecell-covariates-encoded": Tiny(
        "SCVI",
        dict(
            batch_key="batch",
            categorical_covariate_keys=["donor", "single"],
            continuous_covariate_keys=["pct", "depth"],
        ),
        dict(
            dispersion="gene-cell",
            encode_covariates=True,
            n_layers=2,
            use_batch_norm="encoder",
            use_layer_norm="decoder",
        ),
    ),
    "nb-sizefactor-nobatch": Tiny("SCVI", dict(size_factor_key="sf"), dict(gene_likelihood="nb")),
    "zinb-embedding-encoded-ln": Tiny(
        "SCVI",
        dict(batch_key="batch", categorical_covariate_keys=["donor"]),
        dict(
            batch_representation="embedding",
            encode_covariates=True,
            latent_distribution="ln",
            use_observed_lib_size=False,
        ),
    ),
    "nb-embedding-decoder-only-2layers": Tiny(
        "SCVI",
        dict(batch_key="batch", labels_key="cell_type"),
        dict(
            gene_likelihood="nb",
            batch_representation="embedding",
            n_layers=2,
            dispersion="gene-label",
        ),
    ),
    "nb-many-batches-learnedlib-decoderbn": Tiny(
        "SCVI",
        dict(batch_key="many", continuous_covariate_keys=["pct"]),
        dict(
            gene_likelihood="nb",
            dispersion="gene-batch",
            use_observed_lib_size=False,
            use_batch_norm="decoder",
            n_layers=2,
            n_hidden=24,
            n_latent=7,
        ),
    ),
}

#: LinearSCVI configurations of tests/parity/test_linear_scanvi.py.
LINEAR_CONFIGS = {
    "linear-nb-bn-learnedlib-2batch": Tiny("LinearSCVI", dict(batch_key="batch"), size=_LS),
    "linear-zinb-nobn-bias-genebatch-observedlib": Tiny(
        "LinearSCVI",
        dict(batch_key="batch", labels_key="cell_type", layer="counts"),
        dict(
            gene_likelihood="zinb",
            use_batch_norm=False,
            bias=True,
            dispersion="gene-batch",
            use_observed_lib_size=True,
        ),
        size=_LS,
    ),
    "linear-poisson-ln-2layers-manybatches": Tiny(
        "LinearSCVI",
        dict(batch_key="many"),
        dict(gene_likelihood="poisson", latent_distribution="ln", n_layers=2),
        size=_LS,
    ),
}

#: SCANVI configurations of tests/parity/test_linear_scanvi.py (labels: ``ct_unk``).
SCANVI_CONFIGS = {
    "scanvi-zinb-from-scvi-2batch": Tiny(
        "SCANVI", dict(batch_key="batch"), epochs=2, size=_LS, from_scvi=True
    ),
    "scanvi-nb-covariates-learnedlib-2layers": Tiny(
        "SCANVI",
        dict(
            batch_key="batch",
            categorical_covariate_keys=["donor"],
            continuous_covariate_keys=["pct"],
        ),
        dict(
            gene_likelihood="nb",
            dispersion="gene-batch",
            use_observed_lib_size=False,
            encode_covariates=True,
            n_layers=2,
        ),
        epochs=2,
        size=_LS,
    ),
    "scanvi-zinb-ln-layernorm-linear-softmax-classifier": Tiny(
        "SCANVI",
        dict(batch_key="batch"),
        dict(
            latent_distribution="ln",
            linear_classifier=True,
            classifier_parameters={"logits": False},
            use_batch_norm="none",
            use_layer_norm="both",
        ),
        epochs=2,
        size=_LS,
    ),
}

TINY = SCVI_CONFIGS | LINEAR_CONFIGS | SCANVI_CONFIGS


def train_kw() -> dict:
    """Lightning trainer arguments of every tiny model: CPU, quiet, nothing written (imported
    on use: this file is read in environments without torch too)."""
    from scvi_onnx.exporter.parity import QUIET_TRAINING

    return QUIET_TRAINING


def fit(model, epochs: int):
    """Train ``model`` for ``epochs`` on the CPU, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=epochs, **train_kw())
    return model


_TRAINED: dict[str, tuple[Any, Any]] = {}


def train_tiny(name: str, cells) -> tuple[Any, Any]:
    """The tiny model ``TINY[name]`` trained on a copy of ``cells`` (``tiny_cells``), once per
    session: ``(model, its registered AnnData)``. Seeded, so the order of training is free."""
    if name not in _TRAINED:
        scvi = require("scvi")
        spec = TINY[name]
        adata = cells.copy()
        scvi.settings.seed = 0
        kw = spec.size | spec.model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.cls == "SCANVI" and spec.from_scvi:
                scvi.model.SCVI.setup_anndata(adata, labels_key="ct_unk", **spec.setup)
                vae = fit(scvi.model.SCVI(adata, **kw), spec.epochs)
                model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
            elif spec.cls == "SCANVI":
                scvi.model.SCANVI.setup_anndata(
                    adata, labels_key="ct_unk", unlabeled_category="Unknown", **spec.setup
                )
                model = scvi.model.SCANVI(adata, **kw)
            else:
                cls = getattr(scvi.model, spec.cls)
                cls.setup_anndata(adata, **spec.setup)
                model = cls(adata, **kw)
            fit(model, spec.epochs)
        _TRAINED[name] = (model, adata)
    return _TRAINED[name]


@dataclass
class TinyModels:
    """Session cache of the tiny models and their exported bundles (see :func:`train_tiny`)."""

    cells: Any
    tmp_path_factory: Any
    bundles: dict = field(default_factory=dict)

    def model(self, name: str) -> tuple[Any, Any]:
        return train_tiny(name, self.cells)

    def bundle(self, name: str) -> Path:
        """``name``'s bundle, exported once per session."""
        if name not in self.bundles:
            model, _ = self.model(name)
            require("onnx")
            from scvi_onnx.exporter import export_model

            self.bundles[name] = export_model(model, self.tmp_path_factory.mktemp(name) / "bundle")
        return self.bundles[name]


@pytest.fixture(scope="session")
def tiny_models(tiny_cells, tmp_path_factory) -> TinyModels:
    return TinyModels(tiny_cells, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# the noise patch
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def same_noise(model, om, n_obs: int, n_samples: int, *, library: bool = True, z2: bool = True):
    """scvi-tools' ``Normal.rsample`` gets the runtime's draws (seed ``om.seed``) for the cells
    of rows 0..n_obs-1 (the runtime keys a cell's noise by its row in the input).

    scvi-tools must run one minibatch of all cells (``batch_size=n_obs``). Per forward pass it
    draws z (N, L), then with a learned library l (N, 1), then for SCANVI (in
    ``SCANVAE.loss``) z2 (K * N, L), row ``k * N + i``. ``library=False`` / ``z2=False`` leave
    those draws out (calls that make none, such as ``predict``). Every prepared draw must be
    used, in that order and shape.
    """
    scvi = require("scvi")
    from scvi_onnx.exporter.parity import torch_draws
    from scvi_onnx.maths import rng

    cells = np.arange(n_obs)
    L = model.module.n_latent
    seed = om.seed
    ez = rng.normals(seed, rng.STREAM_Z, cells, n_samples * L).reshape(n_obs, n_samples, L)
    el = rng.normals(seed, rng.STREAM_L, cells, n_samples)
    learned = library and not model.module.use_observed_lib_size
    scanvi = z2 and isinstance(model, scvi.model.SCANVI)
    if scanvi:
        K = model.module.n_labels
        ez2 = rng.normals(seed, rng.STREAM_Z2, cells, n_samples * K * L)
        ez2 = ez2.reshape(n_obs, n_samples, K, L)
    queue = []
    for s in range(n_samples):
        queue.append(ez[:, s])
        if learned:
            queue.append(el[:, s : s + 1])
        if scanvi:
            queue.append(ez2[:, s].transpose(1, 0, 2).reshape(K * n_obs, L))
    with torch_draws(queue):
        yield
