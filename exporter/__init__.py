"""Export trained scvi-tools models to scvi-onnx bundles (needs the ``export`` extra).

:mod:`~scvi_onnx.exporter.export` (the orchestration), :mod:`~scvi_onnx.exporter.specs` (one
spec per model class), :mod:`~scvi_onnx.exporter.graphs` (torch modules that trace to the
graphs), :mod:`~scvi_onnx.exporter.probes`, :mod:`~scvi_onnx.exporter.trace`,
:mod:`~scvi_onnx.exporter.inspect` (the model's registry), :mod:`~scvi_onnx.exporter.legacy`
(folders saved by older scvi-tools versions).
"""

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

from .export import export_model, supported_models

#: Model classes the exporter handles -> their scvi-tools module classes.
SUPPORTED_MODELS = supported_models()

__all__ = ["SUPPORTED_MODELS", "export_model", "supported_models"]
