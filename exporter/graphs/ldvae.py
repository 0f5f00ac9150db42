"""LDVAE's ``LinearDecoderSCVI``, traced to the same decoder interface as VAE's."""

from __future__ import annotations

import torch
from torch import nn

from scvi_onnx.errors import UnsupportedModelError

from . import GraphIO
from .layers import FoldedFC


class LinearDecoderGraph(nn.Module):
    """LDVAE's ``LinearDecoderSCVI``: z (S, N, L), library [+ batch] -> px_rate [, px_dropout].

    ``factor_regressor`` and ``px_dropout_decoder`` are one-layer ``FCLayers`` without activation
    (bias off by default, optional batch norm, folded like every other layer); the scale is the
    softmax of ``factor_regressor``.
    """

    def __init__(self, module, io: GraphIO):
        super().__init__()
        self.io = io
        dec = module.decoder
        if module.batch_representation != "one-hot":
            raise UnsupportedModelError("LinearSCVI with a batch embedding is not supported")
        fr = dec.factor_regressor
        n_in = fr.fc_layers[0][0].in_features - sum(fr.n_cat_list)
        self.factor = FoldedFC(fr, n_in)
        self.want_dropout = "px_dropout" in io.outputs
        self.dropout = FoldedFC(dec.px_dropout_decoder, n_in) if self.want_dropout else None

    def forward(self, *args):
        feeds = dict(zip(self.io.inputs, args, strict=True))
        cats: list = [feeds["batch_index"][:, 0] if "batch_index" in feeds else None]
        px_scale = torch.softmax(self.factor(feeds["z"], cats), dim=-1)
        out = [torch.exp(feeds["library"]) * px_scale]
        if self.want_dropout:
            out.append(self.dropout(feeds["z"], cats))
        return tuple(out)
