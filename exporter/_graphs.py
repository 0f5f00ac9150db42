"""Torch modules that trace to the bundle's graphs.

They are rebuilt from a trained scvi-tools ``VAE`` / ``LDVAE`` / ``SCANVAE`` module's weights,
in inference (eval) form:

- BatchNorm1d (running statistics) is folded into the preceding Linear: no
  ``BatchNormalization`` node reaches the graph (it fails on the CUDA EP at large batch).
- One-hot covariate injection ``Linear(cat(x, one_hot(c)))`` becomes ``x @ W_x.T + W_c.T[c]``:
  the same sum without the one-hot matrix, so ~10,000 batches cost a gather, not a matmul.
- Dropout is the identity, and no sampling happens in a graph: the runtime draws all noise.
- LDVAE's linear decoder is :class:`LinearDecoderGraph` (same IO as :class:`DecoderGraph`).
- SCANVAE adds :class:`ClassifierGraph`, :class:`Z2EncoderGraph` and :class:`Z1DecoderGraph`;
  the last two evaluate every label at once (a label axis instead of scvi-tools'
  ``broadcast_labels`` repeat: the label's one-hot column becomes a (K, out) table added on it).

The rebuilt modules are checked against the original scvi-tools modules value by value at
export time (see ``_export.validate``); they never modify the user's module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scvi_onnx.errors import UnsupportedModelError


@dataclass
class _LayerParts:
    weight: torch.Tensor  # (out, n_dense) float64
    bias: torch.Tensor  # (out,)
    cat_tables: list[tuple[int, torch.Tensor]]  # (position in cat list, (n_cat, out))
    layer_norm_eps: float | None
    relu: bool


def _fold_fc_layers(fc, n_dense_in: list[int]) -> list[_LayerParts]:
    """Fold an ``scvi.nn.FCLayers`` into per-layer parts (float64 for exact folding)."""
    n_cat_list = list(fc.n_cat_list)
    n_cont = fc.n_cov - sum(n_cat_list)
    if n_cont != 0:
        raise UnsupportedModelError(
            "FCLayers with n_cont > 0 (continuous covariates injected into every layer) "
            "is not produced by SCVI and is not supported"
        )
    parts = []
    for i, seq in enumerate(fc.fc_layers):
        linear, bn, ln, act, _dropout = (list(seq) + [None] * 5)[:5]
        if not isinstance(linear, nn.Linear):
            raise UnsupportedModelError(f"FCLayers layer {i} does not start with nn.Linear")
        w = linear.weight.detach().to("cpu", torch.float64).clone()
        b = (
            linear.bias.detach().to("cpu", torch.float64).clone()
            if linear.bias is not None
            else torch.zeros(w.shape[0], dtype=torch.float64)
        )
        if bn is not None:
            if not isinstance(bn, nn.BatchNorm1d) or not bn.track_running_stats:
                raise UnsupportedModelError(f"layer {i}: unsupported normalisation {bn!r}")
            rm = bn.running_mean.detach().to("cpu", torch.float64)
            rv = bn.running_var.detach().to("cpu", torch.float64)
            gamma = (
                bn.weight.detach().to("cpu", torch.float64) if bn.affine else torch.ones_like(rm)
            )
            beta = bn.bias.detach().to("cpu", torch.float64) if bn.affine else torch.zeros_like(rm)
            s = gamma / torch.sqrt(rv + bn.eps)
            w = w * s[:, None]
            b = s * (b - rm) + beta
        ln_eps = None
        if ln is not None:
            if not isinstance(ln, nn.LayerNorm) or ln.elementwise_affine:
                raise UnsupportedModelError(f"layer {i}: unsupported layer norm {ln!r}")
            ln_eps = float(ln.eps)
        if act is not None and not isinstance(act, nn.ReLU):
            raise UnsupportedModelError(
                f"layer {i}: activation {type(act).__name__} is not supported (only ReLU)"
            )
        n_dense = n_dense_in[i]
        inject = fc.inject_into_layer(i)
        expected = n_dense + (sum(n_cat_list) if inject else 0)
        if w.shape[1] != expected:
            raise UnsupportedModelError(
                f"layer {i}: Linear has {w.shape[1]} inputs, expected {expected}"
            )
        tables = []
        col = n_dense
        if inject:
            for pos, n_cat in enumerate(n_cat_list):
                if n_cat > 0:
                    tables.append((pos, w[:, col : col + n_cat].T.contiguous()))
                    col += n_cat
        parts.append(_LayerParts(w[:, :n_dense].contiguous(), b, tables, ln_eps, act is not None))
    return parts


class FoldedLayer(nn.Module):
    """``relu?(layer_norm?(x @ W.T + b + sum_k T_k[c_k]))`` with batch norm folded in."""

    def __init__(self, parts: _LayerParts):
        super().__init__()
        self.weight_t = nn.Parameter(parts.weight.T.contiguous().float(), requires_grad=False)
        self.bias = nn.Parameter(parts.bias.float(), requires_grad=False)
        self.cat_pos = [p for p, _ in parts.cat_tables]
        self.cat_tables = nn.ParameterList(
            [nn.Parameter(t.float(), requires_grad=False) for _, t in parts.cat_tables]
        )
        self.ln_eps = parts.layer_norm_eps
        self.relu = parts.relu
        self.n_out = parts.weight.shape[0]

    def forward(self, x: torch.Tensor, cats: list[torch.Tensor]) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t) + self.bias
        for pos, table in zip(self.cat_pos, self.cat_tables, strict=True):
            y = y + table[cats[pos]]  # (N, out), broadcasts over a leading sample axis
        if self.ln_eps is not None:
            y = nn.functional.layer_norm(y, (self.n_out,), eps=self.ln_eps)
        if self.relu:
            y = torch.relu(y)
        return y


class FoldedFC(nn.Module):
    def __init__(self, fc, n_in: int):
        super().__init__()
        dims = [n_in] + [seq[0].out_features for seq in fc.fc_layers][:-1]
        self.layers = nn.ModuleList([FoldedLayer(p) for p in _fold_fc_layers(fc, dims)])

    def forward(self, x: torch.Tensor, cats: list[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cats)
        return x


def _linear(lin: nn.Linear) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        out.weight.copy_(lin.weight.detach().cpu())
        if lin.bias is not None:
            out.bias.copy_(lin.bias.detach().cpu())
    out.requires_grad_(False)
    return out


def _var_activation_name(encoder) -> str:
    act = encoder.var_activation
    if act is torch.exp:
        return "exp"
    if act is nn.functional.softplus or isinstance(act, nn.Softplus):
        return "softplus"
    raise UnsupportedModelError(
        f"Encoder var_activation {act!r} is not supported (torch.exp or softplus only)"
    )


class GaussianHead(nn.Module):
    """``scvi.nn.Encoder`` without the draw: returns (q_m, q_v)."""

    def __init__(self, encoder, n_in: int):
        super().__init__()
        self.fc = FoldedFC(encoder.encoder, n_in)
        self.mean = _linear(encoder.mean_encoder)
        self.var = _linear(encoder.var_encoder)
        self.var_eps = float(encoder.var_eps)
        self.var_act = _var_activation_name(encoder)

    def forward(self, x, cats):
        q = self.fc(x, cats)
        v = self.var(q)
        v = torch.exp(v) if self.var_act == "exp" else nn.functional.softplus(v)
        return self.mean(q), v + self.var_eps


@dataclass(frozen=True)
class GraphSpec:
    """Which inputs/outputs a traced graph has (names from ``scvi_onnx.bundle``)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class EncoderGraph(nn.Module):
    """x_log1p (N, G) = log1p(counts), or x (N, G) counts without ``log_variational``
    [+ covariates] -> qz_m, qz_v [, ql_m, ql_v]."""

    def __init__(self, module, spec: GraphSpec, *, emb_weight=None):
        super().__init__()
        self.spec = spec
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
        feeds = dict(zip(self.spec.inputs, args, strict=True))
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

    def __init__(self, module, spec: GraphSpec, *, emb_weight=None):
        super().__init__()
        self.spec = spec
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
        self.scale = _linear(scale_lin)
        if isinstance(scale_act, nn.Softmax):
            self.scale_act = "softmax"
        elif isinstance(scale_act, nn.Softplus):
            self.scale_act = "softplus"
        else:
            raise UnsupportedModelError(f"px_scale activation {scale_act!r} is not supported")
        self.want_r = "px_r" in spec.outputs
        self.want_dropout = "px_dropout" in spec.outputs
        self.r = _linear(dec.px_r_decoder) if self.want_r else None
        self.dropout = _linear(dec.px_dropout_decoder) if self.want_dropout else None

    def forward(self, *args):
        feeds = dict(zip(self.spec.inputs, args, strict=True))
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


# ----------------------------------------------------------------------------- LinearSCVI
class LinearDecoderGraph(nn.Module):
    """LDVAE's ``LinearDecoderSCVI``: z (S, N, L), library [+ batch] -> px_rate [, px_dropout].

    ``factor_regressor`` and ``px_dropout_decoder`` are one-layer ``FCLayers`` without activation
    (bias off by default, optional batch norm, folded like every other layer); the scale is the
    softmax of ``factor_regressor``.
    """

    def __init__(self, module, spec: GraphSpec):
        super().__init__()
        self.spec = spec
        dec = module.decoder
        if module.batch_representation != "one-hot":
            raise UnsupportedModelError("LinearSCVI with a batch embedding is not supported")
        fr = dec.factor_regressor
        n_in = fr.fc_layers[0][0].in_features - sum(fr.n_cat_list)
        self.factor = FoldedFC(fr, n_in)
        self.want_dropout = "px_dropout" in spec.outputs
        self.dropout = FoldedFC(dec.px_dropout_decoder, n_in) if self.want_dropout else None

    def forward(self, *args):
        feeds = dict(zip(self.spec.inputs, args, strict=True))
        cats: list = [feeds["batch_index"][:, 0] if "batch_index" in feeds else None]
        px_scale = torch.softmax(self.factor(feeds["z"], cats), dim=-1)
        out = [torch.exp(feeds["library"]) * px_scale]
        if self.want_dropout:
            out.append(self.dropout(feeds["z"], cats))
        return tuple(out)


# ----------------------------------------------------------------------------- SCANVI
def _is_fc_layers(m) -> bool:
    return hasattr(m, "fc_layers") and hasattr(m, "n_cat_list")


class ClassifierGraph(nn.Module):
    """SCANVAE's classifier: z (S, N, L) -> class probabilities (S, N, K).

    scvi-tools' ``Classifier`` is ``[FCLayers] -> Linear [-> Softmax]``: with ``logits=True``
    (scvi-tools >= 1.1) the module outputs logits and scvi-tools applies a softmax in ``loss`` and
    ``predict``; older classifiers (``logits=False``) end with ``nn.Softmax``. Either way this
    graph outputs the probabilities scvi-tools uses.
    """

    def __init__(self, classifier, n_latent: int):
        super().__init__()
        layers = list(classifier.classifier)
        self.fc = None
        if layers and _is_fc_layers(layers[0]):
            if sum(layers[0].n_cat_list):
                raise UnsupportedModelError("a classifier with covariates is not supported")
            self.fc = FoldedFC(layers[0], n_latent)
            layers = layers[1:]
        if not layers or not isinstance(layers[0], nn.Linear):
            raise UnsupportedModelError(f"unsupported SCANVI classifier {classifier!r}")
        self.out = _linear(layers[0])
        rest = layers[1:]
        ends_in_softmax = len(rest) == 1 and isinstance(rest[0], nn.Softmax)
        if rest and not ends_in_softmax:
            raise UnsupportedModelError(f"unsupported SCANVI classifier tail {rest!r}")
        if bool(classifier.logits) == ends_in_softmax:
            raise UnsupportedModelError(
                f"SCANVI classifier with logits={classifier.logits} "
                f"{'ends' if ends_in_softmax else 'does not end'} in a softmax"
            )

    def forward(self, z):
        h = self.fc(z, []) if self.fc is not None else z
        return torch.softmax(self.out(h), dim=-1)


class _LabelBroadcastLayer(nn.Module):
    """``relu?(layer_norm?(x @ W.T + b + T))``: ``T`` (K, out) adds label k's one-hot column."""

    def __init__(self, parts: _LayerParts):
        super().__init__()
        self.weight_t = nn.Parameter(parts.weight.T.contiguous().float(), requires_grad=False)
        self.bias = nn.Parameter(parts.bias.float(), requires_grad=False)
        self.table = (
            nn.Parameter(parts.cat_tables[0][1].float(), requires_grad=False)
            if parts.cat_tables
            else None
        )
        self.ln_eps = parts.layer_norm_eps
        self.relu = parts.relu
        self.n_out = parts.weight.shape[0]

    def forward(self, x):
        y = torch.matmul(x, self.weight_t) + self.bias
        if self.table is not None:
            y = y + self.table  # (..., K, out) + (K, out): label k on axis -2
        if self.ln_eps is not None:
            y = nn.functional.layer_norm(y, (self.n_out,), eps=self.ln_eps)
        if self.relu:
            y = torch.relu(y)
        return y


class _LabelBroadcastFC(nn.Module):
    """An ``FCLayers`` with ``n_cat_list=[n_labels]`` evaluated for every label at once.

    Input (..., K or 1, n_in); output (..., K, n_out), the label on axis -2. This is what
    scvi-tools computes with ``broadcast_labels`` (the input repeated once per label with the
    label's one-hot), without the repeat.
    """

    def __init__(self, fc, n_in: int, n_labels: int):
        super().__init__()
        if list(fc.n_cat_list) not in ([n_labels], [0]):
            raise UnsupportedModelError(
                f"expected an FCLayers over the {n_labels} labels, got n_cat_list={fc.n_cat_list}"
            )
        dims = [n_in] + [seq[0].out_features for seq in fc.fc_layers][:-1]
        self.layers = nn.ModuleList([_LabelBroadcastLayer(p) for p in _fold_fc_layers(fc, dims)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Z2EncoderGraph(nn.Module):
    """``encoder_z2_z1`` for every label: z1 (S, N, L) -> qz2_m, qz2_v (S, N, K, L)."""

    def __init__(self, encoder, n_latent: int, n_labels: int):
        super().__init__()
        self.fc = _LabelBroadcastFC(encoder.encoder, n_latent, n_labels)
        self.mean = _linear(encoder.mean_encoder)
        self.var = _linear(encoder.var_encoder)
        self.var_eps = float(encoder.var_eps)
        self.var_act = _var_activation_name(encoder)
        if isinstance(encoder.z_transformation, nn.Softmax):
            raise UnsupportedModelError("encoder_z2_z1 with a logistic-normal z2 is not supported")

    def forward(self, z):
        q = self.fc(z.unsqueeze(-2))
        v = self.var(q)
        v = torch.exp(v) if self.var_act == "exp" else nn.functional.softplus(v)
        return self.mean(q), v + self.var_eps


class Z1DecoderGraph(nn.Module):
    """``decoder_z1_z2`` for every label: z2 (S, N, K, L) -> pz1_m, pz1_v (S, N, K, L)."""

    def __init__(self, decoder, n_latent: int, n_labels: int):
        super().__init__()
        self.fc = _LabelBroadcastFC(decoder.decoder, n_latent, n_labels)
        self.mean = _linear(decoder.mean_decoder)
        self.var = _linear(decoder.var_decoder)

    def forward(self, z2):
        p = self.fc(z2)
        return self.mean(p), torch.exp(self.var(p))


# ----------------------------------------------------------------------------- scoring
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

    def __init__(self, decoder: nn.Module, spec: GraphSpec, config: dict, px_r) -> None:
        super().__init__()
        self.decoder = decoder
        self.spec = spec
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
        feeds = dict(zip(self.spec.inputs, args, strict=True))
        dec_out = self.decoder(*(feeds[n] for n in self.decoder.spec.inputs))
        out = dict(zip(self.decoder.spec.outputs, dec_out, strict=True))
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
