"""VAE's encoder and decoder (``scvi.nn.Encoder``, ``DecoderSCVI``) and the scoring graph."""

from __future__ import annotations

import torch
from torch import nn

from scvi_onnx.errors import UnsupportedModelError

from . import GraphIO
from .layers import FoldedFC, GaussianHead, copy_linear


class EncoderGraph(nn.Module):
    """x_log1p (N, G) = log1p(counts), or x (N, G) counts without ``log_variational``
    [+ covariates] -> qz_m, qz_v [, ql_m, ql_v]."""

    def __init__(self, module, io: GraphIO, *, emb_weight=None):
        super().__init__()
        self.io = io
        self.encode_covariates = bool(module.encode_covariates)
        self.one_hot_batch = module.batch_representation == "one-hot"
        self.emb = (
            nn.Parameter(emb_weight.detach().cpu().float(), requires_grad=False)
            if emb_weight is not None and self.encode_covariates
            else None
        )
        n_in = module.z_encoder.encoder.fc_layers[0][0].in_features - (
            sum(module.z_encoder.encoder.n_cat_list)
        )
        self.z = GaussianHead(module.z_encoder, n_in)
        self.learned_library = not module.use_observed_lib_size
        self.l = GaussianHead(module.l_encoder, n_in) if self.learned_library else None

    def forward(self, *args):
        feeds = dict(zip(self.io.inputs, args, strict=True))
        h = feeds["x_log1p"] if "x_log1p" in feeds else feeds["x"]
        cats: list[torch.Tensor] = []
        if self.encode_covariates:
            if "cont_covs" in feeds:
                h = torch.cat([h, feeds["cont_covs"]], dim=-1)
            if self.emb is not None:
                h = torch.cat([h, self.emb[feeds["batch_index"][:, 0]]], dim=-1)
            if self.one_hot_batch:
                cats.append(feeds["batch_index"][:, 0] if "batch_index" in feeds else None)
            if "cat_covs" in feeds:
                cov = feeds["cat_covs"]
                cats.extend(cov[:, k] for k in range(cov.shape[1]))
        out = list(self.z(h, cats))
        if self.l is not None:
            out.extend(self.l(h, cats))
        return tuple(out)


class DecoderGraph(nn.Module):
    """z (S, N, L), library (S|1, N, 1) [+ covariates] -> px_rate [, px_r] [, px_dropout]."""

    def __init__(self, module, io: GraphIO, *, emb_weight=None):
        super().__init__()
        self.io = io
        dec = module.decoder
        self.one_hot_batch = module.batch_representation == "one-hot"
        self.emb = (
            nn.Parameter(emb_weight.detach().cpu().float(), requires_grad=False)
            if emb_weight is not None
            else None
        )
        n_in = dec.px_decoder.fc_layers[0][0].in_features - sum(dec.px_decoder.n_cat_list)
        self.fc = FoldedFC(dec.px_decoder, n_in)
        scale_lin, scale_act = dec.px_scale_decoder[0], dec.px_scale_decoder[1]
        self.scale = copy_linear(scale_lin)
        if isinstance(scale_act, nn.Softmax):
            self.scale_act = "softmax"
        elif isinstance(scale_act, nn.Softplus):
            self.scale_act = "softplus"
        else:
            raise UnsupportedModelError(f"px_scale activation {scale_act!r} is not supported")
        self.want_r = "px_r" in io.outputs
        self.want_dropout = "px_dropout" in io.outputs
        self.r = copy_linear(dec.px_r_decoder) if self.want_r else None
        self.dropout = copy_linear(dec.px_dropout_decoder) if self.want_dropout else None

    def forward(self, *args):
        feeds = dict(zip(self.io.inputs, args, strict=True))
        z = feeds["z"]
        n_samples = z.shape[0]
        h = z
        if "cont_covs" in feeds:
            cont = feeds["cont_covs"].unsqueeze(0).expand(n_samples, -1, -1)
            h = torch.cat([h, cont], dim=-1)
        if self.emb is not None:
            rep = self.emb[feeds["batch_index"][:, 0]].unsqueeze(0).expand(n_samples, -1, -1)
            h = torch.cat([h, rep], dim=-1)
        cats: list[torch.Tensor] = []
        if self.one_hot_batch:
            cats.append(feeds["batch_index"][:, 0] if "batch_index" in feeds else None)
        if "cat_covs" in feeds:
            cov = feeds["cat_covs"]
            cats.extend(cov[:, k] for k in range(cov.shape[1]))
        px = self.fc(h, cats)
        # The gene-sized heads take their bias as one more input column (a constant 1): a
        # separate bias Add would be one more pass over samples x cells x genes.
        ones = torch.ones_like(px[..., :1])
        px1 = torch.cat([px, ones], dim=-1)

        def head(lin: nn.Linear) -> torch.Tensor:
            w = lin.weight if lin.bias is None else torch.cat([lin.weight, lin.bias[:, None]], 1)
            return px1[..., : w.shape[1]] @ w.T

        logits = head(self.scale)
        if self.scale_act == "softmax":
            px_scale = torch.softmax(logits, dim=-1)
        else:
            px_scale = nn.functional.softplus(logits)
        out = [torch.exp(feeds["library"]) * px_scale]
        if self.want_r:
            out.append(head(self.r))
        if self.want_dropout:
            out.append(head(self.dropout))
        return tuple(out)


class ScoreGraph(nn.Module):
    """The decoder followed by ``log p(x | z)`` summed over genes: (S, N) sums, not (S, N, G).

    For execution providers where copying decoder outputs to the host costs more than computing
    them (CUDA): the likelihood reduction runs where the decoder runs. Inputs: the decoder's,
    then ``counts`` (N, G) [, ``labels`` (N, 1) for gene-label dispersion]. The count terms
    ``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`` are left out (ONNX has no lgamma);
    the runtime adds its per-cell sums, computed once per cell. Same formulas as the runtime's
    numpy kernel (:mod:`scvi_onnx.likelihood`). Dispersion per gene / batch / label only
    (``gene-cell`` needs the per-sample count terms: it stays on the host path).
    """

    def __init__(self, decoder: nn.Module, io: GraphIO, config: dict, px_r) -> None:
        super().__init__()
        self.decoder = decoder
        self.io = io
        self.lik = config["gene_likelihood"]
        self.dispersion = config["dispersion"]
        if self.dispersion == "gene-cell":
            raise UnsupportedModelError("no scoring graph for gene-cell dispersion")
        theta = None
        if self.lik != "poisson":
            t = torch.exp(torch.as_tensor(px_r, dtype=torch.float32))
            theta = t[None] if t.ndim == 1 else t.T.contiguous()  # (C, G)
        self.register_buffer("theta", theta)

    def forward(self, *args):
        feeds = dict(zip(self.io.inputs, args, strict=True))
        dec_out = self.decoder(*(feeds[n] for n in self.decoder.io.inputs))
        out = dict(zip(self.decoder.io.outputs, dec_out, strict=True))
        mu, x = out["px_rate"], feeds["counts"]
        eps = 1e-8
        if self.lik == "poisson":  # xlogy(x, mu) - mu
            ll = torch.where(x == 0, torch.zeros_like(mu), x * torch.log(mu)) - mu
            return ll.sum(-1)
        if self.theta.shape[0] == 1:
            theta = self.theta[0]
        elif self.dispersion == "gene-batch":
            theta = self.theta[feeds["batch_index"][:, 0]]
        else:
            theta = self.theta[feeds["labels"][:, 0]]
        if self.lik == "normal":
            ll = -0.5 * torch.square((x - mu) / theta) - torch.log(theta) - 0.9189385332046727
            return ll.sum(-1)
        th_eps = theta + eps
        a = th_eps + mu
        b = theta * torch.log(th_eps / a)  # log NB probability of a zero
        e = x * torch.log((mu + eps) / a)  # ZINB: only where x > eps (the where below)
        if self.lik == "nb":
            return (b + e).sum(-1)
        # ONNX Softplus (one kernel on CUDA; ONNX Runtime's is the stable form) instead of
        # softplus from elementary ops (7 kernels): each is a full (S, N, G) memory pass
        pi = out["px_dropout"]
        t = b - pi
        ll = torch.where(x > eps, t + e, nn.functional.softplus(t))
        # one float32 sum of the per-gene terms (two sums subtracted: ~2x the rounding)
        return (ll - nn.functional.softplus(-pi)).sum(-1)
