"""Serving: ``scvi-onnx serve`` (an Open Inference Protocol / KServe V2 HTTP server over
bundles) and :func:`connect` (the library's four methods, computed by such a server).

Importing this package does no work: the server's modules (Starlette, uvicorn: the ``serve``
extra) are imported by the ``serve`` command only, and the client uses the standard library.

>>> import scvi_onnx
>>> model = scvi_onnx.connect("http://127.0.0.1:8000/v2/models/pbmc_scvi")  # doctest: +SKIP
>>> z = model.get_latent_representation(adata)                              # doctest: +SKIP
"""

from __future__ import annotations

_LAZY = {
    "connect": "scvi_onnx.serve.client",
    "RemoteModel": "scvi_onnx.serve.client",
    "RemoteSCANVI": "scvi_onnx.serve.client",
    "ServerError": "scvi_onnx.serve.client",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scvi_onnx.serve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
