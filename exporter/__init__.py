"""Export trained scvi-tools models to scvi-onnx bundles (needs the ``export`` extra)."""

from __future__ import annotations

try:
    import onnx  # noqa: F401
    import scvi  # noqa: F401
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by the CLI test without the extra
    raise ImportError(
        f"scvi_onnx.exporter needs torch, scvi-tools and onnx ({e.name} is missing): "
        "pip install 'scvi-onnx[export]'"
    ) from e

from ._export import SUPPORTED_MODELS, export_model

__all__ = ["export_model", "SUPPORTED_MODELS"]
