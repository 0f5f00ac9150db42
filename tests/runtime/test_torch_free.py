"""The runtime works with torch (and scvi-tools, lightning) impossible to import."""

from __future__ import annotations

import json
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


WATCH_SCIPY_SPECIAL = textwrap.dedent(
    """
    import builtins
    import importlib
    import json
    import sys


    def is_special(name, fromlist):
        return (
            name == "scipy.special"
            or name.startswith("scipy.special.")
            or (name == "scipy" and "special" in (fromlist or ()))
        )


    seen = []  # (importing scvi_onnx module, imported name)
    real_import = builtins.__import__
    real_import_module = importlib.import_module


    def watching_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__") or ""
        if importer.partition(".")[0] == "scvi_onnx" and level == 0 and is_special(name, fromlist):
            seen.append((importer, name))
        return real_import(name, globals, locals, fromlist, level)


    def watching_import_module(name, package=None):
        importer = sys._getframe(1).f_globals.get("__name__") or ""
        if importer.partition(".")[0] == "scvi_onnx" and is_special(name, ()):
            seen.append((importer, name))
        return real_import_module(name, package)


    builtins.__import__ = watching_import
    importlib.import_module = watching_import_module
    """
)


def test_latent_needs_no_scipy_special():
    """The cold path (load, then the latent space) runs no import of scipy.special (~0.2 s) in
    scvi-onnx's code; the likelihood methods import it on first use.

    Watched at the import statements of scvi_onnx's own modules (``builtins.__import__`` and
    ``importlib.import_module`` called from them), not through ``sys.modules``: anndata is
    imported first and may import scipy.special itself (anndata 0.12.19 does), which is not
    ours to test."""
    code = WATCH_SCIPY_SPECIAL + textwrap.dedent(
        f"""
        import anndata as ad

        import scvi_onnx

        adata = ad.read_h5ad({str(EXAMPLE_H5AD)!r}, backed="r")
        m = scvi_onnx.load({str(SHIPPED_BUNDLE)!r}, device="cpu")
        m.get_latent_representation(adata)
        m.get_latent_representation(adata, return_dist=True)
        latent = list(seen)
        m.get_elbo(adata)
        print(json.dumps({{"latent": latent, "elbo": seen[len(latent):]}}))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.splitlines()[-1])
    assert seen["latent"] == []
    # the watch sees scvi-onnx's imports at all: the ELBO's draws import scipy.special
    assert any(mod.startswith("scvi_onnx.") for mod, _ in seen["elbo"]), seen
