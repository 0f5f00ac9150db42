"""scvi-onnx: run trained scvi-tools models without torch.

>>> import scvi_onnx
>>> model = scvi_onnx.load("models/pbmc_scvi")          # doctest: +SKIP
>>> z = model.get_latent_representation(adata)          # doctest: +SKIP

Importing this package does no work: onnxruntime and anndata are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import *  # noqa: F403  (typed errors are part of the public API)
from .errors import __all__ as _errors_all

__version__ = "0.2.0"

if TYPE_CHECKING:
    from .linear import OnnxLinearSCVI
    from .model import OnnxSCVI, load
    from .scanvi import OnnxSCANVI
    from .selfcheck import verify

__all__ = [
    "load",
    "verify",
    "OnnxSCVI",
    "OnnxLinearSCVI",
    "OnnxSCANVI",
    "__version__",
    *_errors_all,
]


def __getattr__(name: str) -> Any:
    if name in ("load", "OnnxSCVI"):
        from . import model

        return getattr(model, name)
    if name == "verify":
        from .selfcheck import verify

        return verify
    if name == "OnnxLinearSCVI":
        from .linear import OnnxLinearSCVI

        return OnnxLinearSCVI
    if name == "OnnxSCANVI":
        from .scanvi import OnnxSCANVI

        return OnnxSCANVI
    raise AttributeError(f"module 'scvi_onnx' has no attribute {name!r}")
