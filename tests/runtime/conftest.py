"""Fixtures of the torch-free tests: the shipped bundle, loaded once, and the example query."""

from __future__ import annotations

import numpy as np
import pytest

from ..conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE


@pytest.fixture(scope="session")
def model():
    """The shipped bundle on the CPU, default seed (tests never change its state)."""
    import scvi_onnx

    return scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")


@pytest.fixture(scope="session")
def query():
    """The example query as shipped: 200 cells, CSR float32 (tests copy it before changing it)."""
    import anndata as ad
    import scipy.sparse as sp

    q = ad.read_h5ad(EXAMPLE_H5AD)
    assert q.n_obs == 200 and sp.issparse(q.X) and q.X.dtype == np.float32
    return q


@pytest.fixture()
def out_dir(tmp_path):
    """An empty folder for CLI outputs; a refusal must leave it empty (no temporaries)."""
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(scope="module", params=["compiled", "numpy"])
def kernel(request):
    """The likelihood kernel a test runs (``SCVI_ONNX_KERNELS``): the compiled one (skipped
    where the install built none) and numpy's. Module-scoped, for hypothesis tests; a test of
    the module that does not ask for it may run under either setting (both are correct)."""
    from scvi_onnx.maths import native

    if request.param == "compiled" and native._library() is None:
        pytest.skip("the compiled likelihood kernel is not built (no C compiler at install)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(native.ENV, "numpy" if request.param == "numpy" else "")
        yield request.param
