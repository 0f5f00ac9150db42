"""Probe cells: the inputs every graph is validated on and ``verify`` re-runs.

Synthetic cells (Poisson counts of Dirichlet profiles, every batch, label and covariate
category), plus the first real cells of the model's AnnData when it has one. Their values are
in the bundle's ``probes.npz`` with scvi-tools' torch outputs for them.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from scvi_onnx.bundle import Registry

N_SYNTHETIC_PROBES = 24
N_REAL_PROBES = 16
#: Posterior draws per probe cell fed to the decoders.
N_PROBE_SAMPLES = 2


def probe_cells(
    model,
    registry: Registry,
    n_input: int,
    n_batch: int,
    n_labels: int,
    rng: np.random.Generator,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Probe cells: synthetic ones covering the covariates, plus real ones when available.

    ``extra``: more synthetic inputs of a model (``N_SYNTHETIC_PROBES`` rows each, by their
    scvi-tools ``REGISTRY_KEYS`` names, e.g. TOTALVI's ``proteins``), extended with the real
    cells' like the others."""
    n, g = N_SYNTHETIC_PROBES, n_input
    lib = rng.uniform(200, 5000, size=(n, 1))
    p = rng.dirichlet(np.full(g, 0.3), size=n)
    x = rng.poisson(lib * p).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1.0
    t: dict[str, np.ndarray] = {
        "X": x,
        "batch": (np.arange(n) % max(n_batch, 1)).reshape(-1, 1).astype(np.int64),
        "labels": (np.arange(n) % max(n_labels, 1)).reshape(-1, 1).astype(np.int64),
    }
    if registry.categorical_covariates:
        t["extra_categorical_covs"] = np.stack(
            [rng.integers(0, c.n_categories, n) for c in registry.categorical_covariates], 1
        ).astype(np.int64)
    if registry.continuous_covariates:
        t["extra_continuous_covs"] = rng.normal(
            size=(n, len(registry.continuous_covariates))
        ).astype(np.float32)
    if registry.size_factor_key:
        t["size_factor"] = rng.uniform(0.3, 3.0, size=(n, 1)).astype(np.float32)
    t.update(extra or {})
    adata = getattr(model, "adata", None)
    if adata is not None and adata.n_obs > 0:
        k = min(N_REAL_PROBES, adata.n_obs)
        dl = model._make_data_loader(adata=adata, indices=np.arange(k), batch_size=k)
        real = next(iter(dl))
        keep = real["X"].sum(1) > 0
        for key in t:
            if key in real:
                t[key] = np.concatenate(
                    [t[key], real[key][keep].cpu().numpy().astype(t[key].dtype)]
                )
    return t


def to_torch(t: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(device) for k, v in t.items()}


@contextlib.contextmanager
def module_eval(module):
    """Run the user's module in eval mode, then restore every submodule's train/eval flag.

    torch.distributions' argument checks are off inside (and restored after): the references
    need the modules' values, and a trained model's posterior variance can underflow to 0 on
    a synthetic probe cell, which ``Normal(q_m, q_v.sqrt())`` refuses (a PEAKVI trained 191
    epochs failed its export there). The graphs reproduce such values as they are."""
    from torch.distributions import Distribution

    modes = {name: sub.training for name, sub in module.named_modules()}
    validate = Distribution._validate_args
    with torch.inference_mode():
        module.eval()
        Distribution.set_default_validate_args(False)
        try:
            yield
        finally:
            Distribution.set_default_validate_args(validate)
            for name, sub in module.named_modules():
                sub.train(modes[name])
