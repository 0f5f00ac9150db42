"""PEAKVAE's graphs: the encoder (``q(z | x)`` and the depth ``d``), the decoder, the scorer.

scvi-tools 1.4.2's ``PEAKVAE`` (``scvi/module/_peakvae.py``), in inference form:

- ``z_encoder`` (``scvi.nn.Encoder``, LeakyReLU, ``var_eps=0``; the encoder graph) and
  ``d_encoder`` (a PEAKVAE ``Decoder``: ``FCLayers`` then ``Linear(n_hidden, 1)`` and a sigmoid;
  the depth graph) read the same input, the raw region values ``x`` (not binarised; with
  ``encode_covariates`` the continuous covariates appended and batch / categorical covariates
  injected into the first layer);
- ``z_decoder`` (``FCLayers`` on ``cat(z, cont_covs)`` with batch and categorical covariates
  injected (every layer with ``deeply_inject_covariates``), ``Linear(n_hidden, n_regions)``,
  a sigmoid): the accessibility probability ``p``;
- the scorer: the decoder, then ``log p(x | z) = -BCE(p * d * f, x > 0)`` summed over regions
  (``f = sigmoid(region_factors)``), for devices where ``p`` should not leave the device.
"""

from __future__ import annotations

import torch
from torch import nn

from scvi_onnx.bundle import format as F
from scvi_onnx.errors import UnsupportedModelError

from . import GraphIO
from .layers import FoldedFC, GaussianHead, ProductFC, copy_linear


def _first_linear_inputs(fc) -> int:
    """The dense inputs of an ``FCLayers``' first layer (its one-hot columns excluded)."""
    return fc.fc_layers[0][0].in_features - sum(fc.n_cat_list)


def _cats(feeds: dict, k_cat: int) -> list:
    """The categorical inputs in ``FCLayers``' order: batch first, then the covariates."""
    cats: list = [feeds[F.IN_BATCH][:, 0] if F.IN_BATCH in feeds else None]
    if F.IN_CAT in feeds:
        cov = feeds[F.IN_CAT]
        cats.extend(cov[:, k] for k in range(cov.shape[1]))
    else:
        cats.extend([None] * k_cat)
    return cats


def sigmoid_of_negated(v: torch.Tensor) -> torch.Tensor:
    """``sigmoid(-v)`` as torch computes a sigmoid, ``1 / (1 + exp(-x))`` with ``x = -v``.

    Not ONNX's ``Sigmoid``: ONNX Runtime's CPU kernel is accurate to ~1e-7 in absolute terms,
    not relative ones. Below a logit of -10 its relative error reaches 460%, and below -18 it
    returns 0 (torch: 1.5e-8 at -18, 2e-22 at -50). The accessibility ``p`` and the depth ``d``
    enter the likelihood through ``log(p d f)`` at the accessible regions, where a relative
    error is an absolute one: a model whose logits reach -20 (one without layer norm, a few
    epochs in) scored 300-5,800 nats per probe cell away from scvi-tools and failed its export.
    ``Exp``, ``Add`` and ``Div`` are exact to float32 rounding everywhere (2.5e-7 relative
    against torch from -40 to 40). The caller passes the negated logits, so the
    negation folds into the weights before them.
    """
    # Div(1, .), not Reciprocal: ONNX Runtime's Reciprocal is a slower kernel (1.36 against
    # 1.53 ms for the three ops over 1,024 x 2,000 values, one thread; Sigmoid: 0.59)
    return torch.div(torch.ones((), dtype=v.dtype), torch.exp(v) + 1.0)


class SigmoidHead(nn.Module):
    """PEAKVAE's ``Decoder``: ``sigmoid(Linear(FCLayers(h)))``."""

    def __init__(self, decoder, n_in: int):
        super().__init__()
        self.fc = FoldedFC(decoder.px_decoder, n_in)
        lin, act = decoder.output[0], decoder.output[1]
        if not isinstance(lin, nn.Linear) or not isinstance(act, nn.Sigmoid):
            raise UnsupportedModelError(
                f"PEAKVAE decoder output {decoder.output!r} is not Linear + Sigmoid"
            )
        self.out = copy_linear(lin)
        with torch.no_grad():  # negated: see sigmoid_of_negated
            self.out.weight.neg_()
            if self.out.bias is not None:
                self.out.bias.neg_()

    def forward(self, h, cats):
        return self.finish(self.fc(h, cats))

    def finish(self, q):
        return sigmoid_of_negated(self.out(q))


class _EncoderInput(nn.Module):
    """What PEAKVAE's encoders read: ``x`` (with ``encode_covariates``: the continuous
    covariates appended, batch and categorical covariates for the first layer)."""

    def __init__(self, module, io: GraphIO, n_cat_covs: int):
        super().__init__()
        self.io = io
        self.n_cat_covs = n_cat_covs
        self.encode_covariates = bool(module.encode_covariates)
        self.n_in = _first_linear_inputs(module.z_encoder.encoder)

    def inputs(self, args) -> tuple[torch.Tensor, list]:
        feeds = dict(zip(self.io.inputs, args, strict=True))
        h = feeds[F.IN_X]
        if not self.encode_covariates:
            return h, []
        if F.IN_CONT in feeds:
            h = torch.cat([h, feeds[F.IN_CONT]], dim=-1)
        return h, _cats(feeds, self.n_cat_covs)


class EncoderGraph(_EncoderInput):
    """x (N, R) [+ covariates] -> qz_m, qz_v (``z_encoder``)."""

    def __init__(self, module, io: GraphIO, n_cat_covs: int):
        super().__init__(module, io, n_cat_covs)
        self.z = GaussianHead(module.z_encoder, self.n_in)

    def forward(self, *args):
        return self.z(*self.inputs(args))


class DepthGraph(_EncoderInput):
    """x (N, R) [+ covariates] -> depth (N, 1) (``d_encoder``, with ``model_depth``): a graph of
    its own, as the latent space does not need it (ONNX Runtime runs every node of a graph
    whatever outputs are asked for, and this encoder costs as much as the z encoder)."""

    def __init__(self, module, io: GraphIO, n_cat_covs: int):
        super().__init__(module, io, n_cat_covs)
        self.d = SigmoidHead(module.d_encoder, self.n_in)

    def forward(self, *args):
        return self.d(*self.inputs(args))


class _SparseInput(nn.Module):
    """What the sparse graphs read: ``x_w = x @ W`` (the first layer's product over the
    regions, computed by the runtime), the continuous covariates (their rows of ``W`` stay
    here) and the categorical covariates, with ``encode_covariates``."""

    def __init__(self, full: _EncoderInput, head: nn.Module, io: GraphIO, n_regions: int):
        super().__init__()
        self.io = io
        self.n_cat_covs = full.n_cat_covs
        self.encode_covariates = full.encode_covariates
        self.fc = ProductFC(head.fc, n_regions)
        self.head = head  # its finish(); its first layer's weights are not traced

    def forward(self, *args):
        feeds = dict(zip(self.io.inputs, args, strict=True))
        rest, cats = None, []
        if self.encode_covariates:
            rest = feeds.get(F.IN_CONT)
            cats = _cats(feeds, self.n_cat_covs)
        return self.head.finish(self.fc(feeds[F.IN_X_PRODUCT], rest, cats))


def sparse_graph(full: EncoderGraph | DepthGraph, io: GraphIO, n_regions: int) -> _SparseInput:
    """The encoder (or depth encoder) after its first layer's product over the regions."""
    head = full.z if isinstance(full, EncoderGraph) else full.d
    return _SparseInput(full, head, io, n_regions)


def first_layer_weight(full: EncoderGraph | DepthGraph) -> torch.Tensor:
    """The full graph's first-layer weight ``(n_in, H)``, as traced into its file."""
    head = full.z if isinstance(full, EncoderGraph) else full.d
    return head.fc.layers[0].weight_t


class DecoderGraph(nn.Module):
    """z (S, N, L) [+ covariates] -> px (S, N, R), the accessibility probability."""

    def __init__(self, module, io: GraphIO, n_cat_covs: int):
        super().__init__()
        self.io = io
        self.n_cat_covs = n_cat_covs
        dec = module.z_decoder
        self.fc = FoldedFC(dec.px_decoder, _first_linear_inputs(dec.px_decoder))
        lin = dec.output[0]
        # the region-sized head takes its bias as one more input column (a constant 1): a
        # separate bias Add would be one more pass over samples x cells x regions. Negated:
        # the sigmoid is sigmoid_of_negated (a Neg would be one more pass too).
        w = lin.weight.detach().cpu().float()
        if lin.bias is not None:
            w = torch.cat([w, lin.bias.detach().cpu().float()[:, None]], 1)
        self.head_t = nn.Parameter(-w.T.contiguous(), requires_grad=False)
        self.has_bias = lin.bias is not None

    def forward(self, *args):
        feeds = dict(zip(self.io.inputs, args, strict=True))
        z = feeds[F.IN_Z]
        h = z
        if F.IN_CONT in feeds:
            cont = feeds[F.IN_CONT].unsqueeze(0).expand(z.shape[0], -1, -1)
            h = torch.cat([h, cont], dim=-1)
        px = self.fc(h, _cats(feeds, self.n_cat_covs))
        if self.has_bias:
            px = torch.cat([px, torch.ones_like(px[..., :1])], dim=-1)
        return sigmoid_of_negated(px @ self.head_t)


class ScoreGraph(nn.Module):
    """The decoder, then ``-BCE(p * d * f, x > 0)`` summed over regions: (S, N), not (S, N, R).

    Inputs: the decoder's, then ``depth`` (N, 1) (PEAKVAE's ``d``; ones without
    ``model_depth``) and ``counts`` (N, R), the raw region values (binarised here, ``x > 0``).
    torch's ``binary_cross_entropy`` clamps each log at -100; so does this graph. It takes one
    log per element, of ``q`` where ``x > 0`` and of ``1 - q`` elsewhere (torch: ``log1p(-q)``;
    they differ by float32 rounding of ``1 - q``, ~6e-8 absolute per region).
    """

    def __init__(self, decoder: DecoderGraph, io: GraphIO, region_factors) -> None:
        super().__init__()
        self.decoder = decoder
        self.io = io
        f = None if region_factors is None else torch.as_tensor(region_factors).float()
        self.register_buffer("f", f)

    def forward(self, *args):
        feeds = dict(zip(self.io.inputs, args, strict=True))
        px = self.decoder(*(feeds[n] for n in self.decoder.io.inputs))
        q = px * feeds[F.IN_DEPTH]  # (S, N, R) * (N, 1), as scvi-tools: (p * d) * f
        if self.f is not None:
            q = q * self.f
        y = feeds[F.IN_COUNTS] > 0
        ll = torch.clamp(torch.log(torch.where(y, q, 1.0 - q)), min=F.BCE_LOG_MIN)
        return ll.sum(-1)
