"""The runtime works with torch (and scvi-tools, lightning) impossible to import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from ..conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE

SCRIPT = textwrap.dedent(
    f"""
    import sys

    class Block:
        BLOCKED = ("torch", "scvi", "lightning", "pytorch_lightning", "jax")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"blocked import of {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    import anndata as ad
    import numpy as np
    import scvi_onnx

    adata = ad.read_h5ad({str(EXAMPLE_H5AD)!r}, backed="r")
    m = scvi_onnx.load({str(SHIPPED_BUNDLE)!r}, device="cpu")
    z = m.get_latent_representation(adata)
    zm, zv = m.get_latent_representation(adata, return_dist=True)
    e = m.get_elbo(adata)
    r = m.get_reconstruction_error(adata)["reconstruction_loss"]
    ll = m.get_marginal_ll(adata, n_mc_samples=20)
    assert z.shape == (200, 10) and np.isfinite([e, r, ll]).all()
    assert scvi_onnx.verify({str(SHIPPED_BUNDLE)!r}).ok
    bad = [k for k in sys.modules if k.split(".")[0] in Block.BLOCKED]
    assert not bad, bad
    print("OK", e, r, ll)
    """
)


def test_runtime_without_torch():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("OK")


def test_import_is_light():
    code = (
        "import sys, scvi_onnx; "
        "heavy = [m for m in ('onnxruntime', 'anndata', 'torch', 'scipy') if m in sys.modules]; "
        "print(heavy)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_latent_needs_no_scipy_special():
    """The cold path (load, then the latent space) leaves scipy.special (~0.2 s to import)
    unimported; the likelihood methods import it on first use."""
    code = textwrap.dedent(
        f"""
        import sys
        # as in the runtime's base install: with dask present (the test extra), anndata
        # imports it, and scipy.special with it
        sys.modules["dask"] = None
        import anndata as ad
        import scvi_onnx

        adata = ad.read_h5ad({str(EXAMPLE_H5AD)!r}, backed="r")
        m = scvi_onnx.load({str(SHIPPED_BUNDLE)!r}, device="cpu")
        m.get_latent_representation(adata)
        print("scipy.special" in sys.modules)
        m.get_elbo(adata)
        print("scipy.special" in sys.modules)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["False", "True"]
