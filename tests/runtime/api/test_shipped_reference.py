"""The four methods on the shipped bundle against scvi-tools' own per-cell values, without torch.

``tests/data/shipped_reference.npz`` holds what scvi-tools 1.4.2 computed for
``models/pbmc_scvi_torch`` on the example query, fed the runtime's noise (recorded by
scripts/record_shipped_reference.py). Tolerances are the parity tests' (tests/parity): this is
the shipped model's parity test, in the torch-free run.
"""

from __future__ import annotations

import numpy as np
import pytest

from scvi_onnx.bundle import format as F
from scvi_onnx.bundle import sha256_file

from ...conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE, SHIPPED_REFERENCE

RERECORD = "re-run scripts/record_shipped_reference.py"


@pytest.fixture(scope="module")
def ref():
    with np.load(SHIPPED_REFERENCE, allow_pickle=False) as f:
        r = {k: f[k] for k in f.files}
    # recorded for this bundle and this query, or the comparison means nothing
    assert str(r["manifest_sha256"]) == sha256_file(SHIPPED_BUNDLE / F.MANIFEST_FILE), RERECORD
    assert str(r["query_sha256"]) == sha256_file(EXAMPLE_H5AD), RERECORD
    return r


@pytest.fixture(scope="module")
def seeded(ref):
    import scvi_onnx

    return scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", seed=int(ref["seed"]))


def test_reference_is_small_and_outside_the_bundle():
    assert SHIPPED_REFERENCE.stat().st_size < 200 * 1024
    assert not SHIPPED_REFERENCE.resolve().is_relative_to(SHIPPED_BUNDLE.resolve())


def test_latent(seeded, query, ref):
    n = len(ref["latent_mean"])
    mean, var = seeded.get_latent_representation(query[:n], return_dist=True)
    np.testing.assert_allclose(mean, ref["latent_mean"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(var, ref["latent_var"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        seeded.get_latent_representation(query)[:n], ref["latent_mean"], atol=1e-4, rtol=0
    )


def test_elbo(seeded, query, ref):
    got = seeded.get_elbo(query, return_mean=False)
    np.testing.assert_allclose(got, ref["elbo"], rtol=2e-5, atol=2e-3)


def test_reconstruction_error(seeded, query, ref):
    got = seeded.get_reconstruction_error(query, return_mean=False, batch_size=37)
    np.testing.assert_allclose(
        got["reconstruction_loss"], ref["reconstruction_loss"], rtol=2e-5, atol=2e-3
    )


@pytest.mark.parametrize("per_pass", [None, 7])
def test_marginal_ll(seeded, query, ref, per_pass):
    n, s = len(ref["marginal_ll"]), int(ref["n_mc_samples"])
    got = seeded.get_marginal_ll(
        query[:n], n_mc_samples=s, return_mean=False, n_mc_samples_per_pass=per_pass
    )
    np.testing.assert_allclose(got, ref["marginal_ll"], rtol=2e-5, atol=2e-3)


def test_scoring_graph(ref, query):
    """The scoring graph (CUDA's path, run here on the CPU provider) gives them too."""
    import scvi_onnx

    graph = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", seed=int(ref["seed"]), scoring="graph")
    np.testing.assert_allclose(
        graph.get_elbo(query, return_mean=False), ref["elbo"], rtol=2e-5, atol=2e-3
    )
    n, s = len(ref["marginal_ll"]), int(ref["n_mc_samples"])
    np.testing.assert_allclose(
        graph.get_marginal_ll(query[:n], n_mc_samples=s, return_mean=False),
        ref["marginal_ll"],
        rtol=2e-5,
        atol=2e-3,
    )
