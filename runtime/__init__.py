"""scvi-onnx: run trained scvi-tools models without torch.

>>> import scvi_onnx
>>> model = scvi_onnx.load("models/pbmc_scvi")          # doctest: +SKIP
>>> z = model.get_latent_representation(adata)          # doctest: +SKIP

Importing this package does no work: onnxruntime and anndata are imported on first use.
"""

from .errors import *  # noqa: F403  (typed errors are part of the public API)
from .errors import __all__ as _errors_all

__version__ = "0.3.0"

#: Public name -> the module that defines it (imported on first use).
_LAZY = {
    "load": "scvi_onnx.api.base",
    "OnnxVAEModel": "scvi_onnx.api.base",
    "OnnxSCVI": "scvi_onnx.api.scvi",
    "OnnxLinearSCVI": "scvi_onnx.api.linear",
    "OnnxSCANVI": "scvi_onnx.api.scanvi",
    "OnnxTOTALVI": "scvi_onnx.api.totalvi",
    "OnnxPEAKVI": "scvi_onnx.api.peakvi",
    "verify": "scvi_onnx.selfcheck",
    "connect": "scvi_onnx.serve.client",
}

__all__ = [*_LAZY, "__version__", *_errors_all]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scvi_onnx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
