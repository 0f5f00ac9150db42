"""Torch modules that trace to a bundle's graphs, rebuilt from a trained module's weights.

:mod:`~scvi_onnx.exporter.graphs.layers` (folded ``FCLayers`` and encoders),
:mod:`~scvi_onnx.exporter.graphs.vae` (VAE's encoder and decoder, and the scoring graph),
:mod:`~scvi_onnx.exporter.graphs.ldvae` (LDVAE's linear decoder),
:mod:`~scvi_onnx.exporter.graphs.scanvae` (SCANVAE's classifier and label-broadcast graphs).
They never modify the user's module; the export checks them against it value by value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GraphIO:
    """The input and output names of a traced graph (names from ``scvi_onnx.bundle.format``)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
