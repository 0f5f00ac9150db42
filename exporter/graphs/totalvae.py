"""TOTALVAE's encoder and decoder (``scvi.nn.EncoderTOTALVI``, ``DecoderTOTALVI``) without
their draws.

``EncoderTOTALVI`` draws z and the log-library; ``DecoderTOTALVI`` draws the protein
background's log-mean from ``Normal(back_alpha, back_beta)``. The graphs output those
distributions' parameters; the runtime draws (its ``STREAM_Z``, ``STREAM_L`` and
``STREAM_PRO_BACK`` streams) and computes everything that follows a draw in numpy.
"""

from __future__ import annotations

import torch
from torch import nn

from scvi_onnx.bundle import format as F
from scvi_onnx.errors import UnsupportedModelError

from . import GraphIO
from .layers import FoldedFC, WideHead, copy_linear


def _n_dense_in(fc) -> int:
    """Dense inputs of an ``FCLayers``' first layer (its width less the one-hot covariates)."""
    return fc.fc_layers[0][0].in_features - sum(fc.n_cat_list)


def _cats(feeds: dict, n_cats: int) -> list:
    """The categorical inputs in ``FCLayers``' order: the batch, then each covariate."""
    cats: list = [feeds["batch_index"][:, 0] if "batch_index" in feeds else None]
    if "cat_covs" in feeds:
        cov = feeds["cat_covs"]
        cats.extend(cov[:, k] for k in range(cov.shape[1]))
    while len(cats) < n_cats:  # covariates of one category (FCLayers drops them)
        cats.append(None)
    return cats


def _activation(act) -> str:
    """``DecoderTOTALVI.activation_function_bg``: softplus (1.2+) or exp (older, or chosen)."""
    if isinstance(act, nn.Softplus):
        if act.beta != 1 or act.threshold != 20:
            raise UnsupportedModelError(f"background activation {act!r} is not supported")
        return "softplus"
    if type(act).__name__ == "ExpActivation":
        return "exp"
    raise UnsupportedModelError(
        f"DecoderTOTALVI background activation {act!r} is not supported (softplus or exp)"
    )


class TotalEncoderGraph(nn.Module):
    """xy_norm (N, G + P) [+ cont_covs, batch_index, cat_covs] -> qz_m, qz_v [, ql_m, ql_v].

    ``EncoderTOTALVI`` without its draws: ``q_v = exp(.) + 1e-4`` for z and the log-library.
    """

    def __init__(self, module, io: GraphIO):
        super().__init__()
        self.io = io
        enc = module.encoder
        self.encode_covariates = bool(module.encode_covariates)
        n_in = _n_dense_in(enc.encoder)
        self.n_cats = len(enc.encoder.n_cat_list)
        self.fc = FoldedFC(enc.encoder, n_in)
        self.z_mean = copy_linear(enc.z_mean_encoder)
        self.z_var = copy_linear(enc.z_var_encoder)
        self.want_l = F.OUT_QL_M in io.outputs
        if self.want_l:
            self.l_fc = FoldedFC(enc.l_gene_encoder, n_in)
            self.l_mean = copy_linear(enc.l_gene_mean_encoder)
            self.l_var = copy_linear(enc.l_gene_var_encoder)

    def forward(self, *args):
        feeds = dict(zip(self.io.inputs, args, strict=True))
        h = feeds[F.IN_XY_NORM]
        cats: list = []
        if self.encode_covariates:
            if F.IN_CONT in feeds:
                h = torch.cat([h, feeds[F.IN_CONT]], dim=-1)
            cats = _cats(feeds, self.n_cats)
        q = self.fc(h, cats)
        out = [self.z_mean(q), torch.exp(self.z_var(q)) + F.VAR_EPS]
        if self.want_l:
            ql = self.l_fc(h, cats)
            out += [self.l_mean(ql), torch.exp(self.l_var(ql)) + F.VAR_EPS]
        return tuple(out)


class TotalDecoderGraph(nn.Module):
    """z (S, N, L), library (S|1, N, 1) [+ cont_covs, batch_index, cat_covs] -> px_rate
    [, px_dropout], py_back_alpha, py_back_beta, py_fore_scale, py_mixing.

    ``DecoderTOTALVI`` up to its background draw: the draw ``log_back = alpha + beta * eps``,
    ``rate_back = exp(log_back)`` and ``rate_fore = rate_back * fore_scale`` are the runtime's.
    ``library`` is the library size itself (observed total counts, ``exp`` of the drawn
    log-library, or the size factor), as ``DecoderTOTALVI`` multiplies it.
    """

    def __init__(self, module, io: GraphIO):
        super().__init__()
        self.io = io
        dec = module.decoder
        n_in = _n_dense_in(dec.px_decoder)  # n_latent + continuous covariates
        n_head = _n_dense_in(dec.px_scale_decoder)  # n_hidden + n_in
        self.n_cats = len(dec.px_decoder.n_cat_list)
        self.px_fc = FoldedFC(dec.px_decoder, n_in)
        self.px_scale = WideHead(dec.px_scale_decoder, n_head)  # gene-sized
        act = dec.px_scale_activation
        if isinstance(act, nn.Softmax):
            self.scale_act = "softmax"
        elif isinstance(act, nn.Softplus):
            self.scale_act = "softplus"
        else:
            raise UnsupportedModelError(f"px_scale activation {act!r} is not supported")
        self.back_fc = FoldedFC(dec.py_back_decoder, n_in)
        self.back_alpha = FoldedFC(dec.py_back_mean_log_alpha, n_head)
        self.back_beta = FoldedFC(dec.py_back_mean_log_beta, n_head)
        self.bg_act = _activation(dec.activation_function_bg)
        self.fore_fc = FoldedFC(dec.py_fore_decoder, n_in)
        self.fore_scale = FoldedFC(dec.py_fore_scale_decoder, n_head)
        self.mix_fc = FoldedFC(dec.sigmoid_decoder, n_in)
        self.want_dropout = F.OUT_PX_DROPOUT in io.outputs
        if self.want_dropout:
            self.dropout = WideHead(dec.px_dropout_decoder_gene, n_head)
        self.mixing = FoldedFC(dec.py_background_decoder, n_head)

    def forward(self, *args):
        feeds = dict(zip(self.io.inputs, args, strict=True))
        z = feeds[F.IN_Z]
        if F.IN_CONT in feeds:
            cont = feeds[F.IN_CONT].unsqueeze(0).expand(z.shape[0], -1, -1)
            z = torch.cat([z, cont], dim=-1)
        cats = _cats(feeds, self.n_cats)

        def head(trunk: nn.Module, lin: nn.Module) -> torch.Tensor:
            return lin(torch.cat([trunk(z, cats), z], dim=-1), cats)

        logits = head(self.px_fc, self.px_scale)
        if self.scale_act == "softmax":
            px_scale = torch.softmax(logits, dim=-1)
        else:
            px_scale = nn.functional.softplus(logits)
        out = [feeds[F.IN_LIBRARY] * px_scale]
        back = torch.cat([self.back_fc(z, cats), z], dim=-1)
        alpha = self.back_alpha(back, cats)
        b = self.back_beta(back, cats)
        beta = (torch.exp(b) if self.bg_act == "exp" else nn.functional.softplus(b)) + (
            F.BACK_BETA_EPS
        )
        fore = head(self.fore_fc, self.fore_scale) + 1 + 1e-8
        mix = torch.cat([self.mix_fc(z, cats), z], dim=-1)
        if self.want_dropout:
            out.append(self.dropout(mix, cats))
        out += [alpha, beta, fore, self.mixing(mix, cats)]
        return tuple(out)


__all__ = ["TotalDecoderGraph", "TotalEncoderGraph", "copy_linear"]
