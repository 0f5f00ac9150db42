"""``scvi.model.SCVI`` without torch."""

from __future__ import annotations

from .base import OnnxVAEModel


class OnnxSCVI(OnnxVAEModel):
    """A frozen ``scvi.model.SCVI``; use :func:`scvi_onnx.load` to create one.

    Its four methods are :class:`~scvi_onnx.api.base.OnnxVAEModel`'s over the ``VAE`` module
    (:mod:`scvi_onnx.models.vae`).
    """
