"""scvi-tools' ``LDVAE`` (the module of LinearSCVI).

LDVAE differs from VAE only in its decoder (``LinearDecoderSCVI``: a softmax of one linear layer
of z, with optional batch norm folded at export), which the exporter traces to the same
``decoder.onnx`` interface: its terms are :class:`~scvi_onnx.models.vae.VAE`'s. Its loadings
(``get_loadings``) are stored in ``arrays.npz`` and read by the public class.
"""

from __future__ import annotations

from .vae import VAE


class LDVAE(VAE):
    """``LDVAE``: VAE's terms over a linear decoder graph."""
