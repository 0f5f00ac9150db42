"""scvi-tools' ``FCLayers`` and ``Encoder`` in inference form, ready to trace.

- BatchNorm1d (running statistics) is folded into the preceding Linear: no
  ``BatchNormalization`` node reaches a graph (it fails on the CUDA EP at large batch).
- One-hot covariate injection ``Linear(cat(x, one_hot(c)))`` becomes ``x @ W_x.T + W_c.T[c]``:
  the same sum without the one-hot matrix, so ~10,000 batches cost a gather, not a matmul.
- Activations are copies of the module's own (ReLU for SCVI, LeakyReLU for PEAKVI, any of
  :data:`ACTIVATIONS`), traced as they are.
- Dropout is the identity, and no sampling happens in a graph: the runtime draws all noise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from scvi_onnx.errors import UnsupportedModelError


@dataclass
class LayerParts:
    weight: torch.Tensor  # (out, n_dense) float64
    bias: torch.Tensor  # (out,)
    cat_tables: list[tuple[int, torch.Tensor]]  # (position in cat list, (n_cat, out))
    layer_norm_eps: float | None
    activation: nn.Module | None  # a copy of the layer's activation module


#: Activation modules a layer may hold (``FCLayers(activation_fn=...)``): elementwise modules
#: whose ONNX export is exact to float32 rounding (the export validates every graph anyway).
#: Their copies are traced as they are, with their settings (LeakyReLU's slope, ELU's alpha).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Identity,
)


def copy_activation(act: nn.Module | None, where: str) -> nn.Module | None:
    """A frozen copy of an activation module of :data:`ACTIVATIONS` (exact type: a subclass
    may compute something else); an :class:`UnsupportedModelError` for any other."""
    if act is None:
        return None
    if type(act) not in ACTIVATIONS:
        names = ", ".join(a.__name__ for a in ACTIVATIONS)
        raise UnsupportedModelError(
            f"{where}: activation {type(act).__name__} is not supported (supported: {names})"
        )
    out = copy.deepcopy(act).to("cpu").float()
    out.requires_grad_(False)
    if hasattr(out, "inplace"):
        out.inplace = False  # the traced graph must not depend on in-place aliasing
    return out


def fold_fc_layers(fc, n_dense_in: list[int]) -> list[LayerParts]:
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
        activation = copy_activation(act, f"layer {i}")
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
        parts.append(LayerParts(w[:, :n_dense].contiguous(), b, tables, ln_eps, activation))
    return parts


class FoldedLayer(nn.Module):
    """``act?(layer_norm?(x @ W.T + b + sum_k T_k[c_k]))`` with batch norm folded in."""

    def __init__(self, parts: LayerParts):
        super().__init__()
        self.weight_t = nn.Parameter(parts.weight.T.contiguous().float(), requires_grad=False)
        self.bias = nn.Parameter(parts.bias.float(), requires_grad=False)
        self.cat_pos = [p for p, _ in parts.cat_tables]
        self.cat_tables = nn.ParameterList(
            [nn.Parameter(t.float(), requires_grad=False) for _, t in parts.cat_tables]
        )
        self.ln_eps = parts.layer_norm_eps
        self.act = parts.activation
        self.n_out = parts.weight.shape[0]

    def forward(self, x: torch.Tensor, cats: list[torch.Tensor]) -> torch.Tensor:
        return self.finish(torch.matmul(x, self.weight_t), cats)

    def finish(self, y: torch.Tensor, cats: list[torch.Tensor]) -> torch.Tensor:
        """Everything after the product ``x @ W``: bias, tables, layer norm, activation."""
        y = y + self.bias
        for pos, table in zip(self.cat_pos, self.cat_tables, strict=True):
            y = y + table[cats[pos]]  # (N, out), broadcasts over a leading sample axis
        if self.ln_eps is not None:
            y = nn.functional.layer_norm(y, (self.n_out,), eps=self.ln_eps)
        if self.act is not None:
            y = self.act(y)
        return y


class FoldedFC(nn.Module):
    def __init__(self, fc, n_in: int):
        super().__init__()
        dims = [n_in] + [seq[0].out_features for seq in fc.fc_layers][:-1]
        self.layers = nn.ModuleList([FoldedLayer(p) for p in fold_fc_layers(fc, dims)])

    def forward(self, x: torch.Tensor, cats: list[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cats)
        return x


class ProductLayer(nn.Module):
    """A :class:`FoldedLayer` given ``x_w = x[:, :n_x] @ W[:n_x]``, the product over its
    first ``n_x`` inputs, computed outside the graph (PEAKVI's regions, from the non-zero
    entries): ``x_w + rest @ W[n_x:]``, then the layer's bias, tables, norm and activation.

    Holds copies of the layer's small parameters only: ``W[:n_x]`` is not in the graph (the
    runtime reads it from the full graph's file)."""

    def __init__(self, layer: FoldedLayer, n_x: int):
        super().__init__()
        w = layer.weight_t.detach()
        self.rest_t = (
            nn.Parameter(w[n_x:].clone(), requires_grad=False) if w.shape[0] > n_x else None
        )
        # what FoldedLayer.finish reads (the same parameter objects: never modified)
        self.bias = layer.bias
        self.cat_pos = list(layer.cat_pos)
        self.cat_tables = nn.ParameterList(list(layer.cat_tables))
        self.ln_eps, self.act, self.n_out = layer.ln_eps, layer.act, layer.n_out

    def forward(self, x_w: torch.Tensor, rest, cats: list[torch.Tensor]) -> torch.Tensor:
        y = x_w if self.rest_t is None else x_w + torch.matmul(rest, self.rest_t)
        return FoldedLayer.finish(self, y, cats)


class ProductFC(nn.Module):
    """A :class:`FoldedFC` whose first layer is a :class:`ProductLayer`."""

    def __init__(self, fc: FoldedFC, n_x: int):
        super().__init__()
        self.first = ProductLayer(fc.layers[0], n_x)
        self.others = nn.ModuleList(list(fc.layers)[1:])

    def forward(self, x_w: torch.Tensor, rest, cats: list[torch.Tensor]) -> torch.Tensor:
        x = self.first(x_w, rest, cats)
        for layer in self.others:
            x = layer(x, cats)
        return x


def copy_linear(lin: nn.Linear) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        out.weight.copy_(lin.weight.detach().cpu())
        if lin.bias is not None:
            out.bias.copy_(lin.bias.detach().cpu())
    out.requires_grad_(False)
    return out


def var_activation_name(encoder) -> str:
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
        self.mean = copy_linear(encoder.mean_encoder)
        self.var = copy_linear(encoder.var_encoder)
        self.var_eps = float(encoder.var_eps)
        self.var_act = var_activation_name(encoder)

    def forward(self, x, cats):
        return self.finish(self.fc(x, cats))

    def finish(self, q):
        """``(q_m, q_v)`` from the last hidden layer."""
        v = self.var(q)
        v = torch.exp(v) if self.var_act == "exp" else nn.functional.softplus(v)
        return self.mean(q), v + self.var_eps


class WideHead(nn.Module):
    """A one-layer ``FCLayers`` without normalisation or activation whose output is wide (a
    decoder's gene-sized head), as one matrix product.

    Its bias, and its one-hot covariates when they are few (at most ``max_onehot`` columns in
    all), become extra input columns (a constant 1, the one-hot rows gathered from an
    identity): ``[x, onehot(c), 1] @ [W_x; W_c; b]``. A separate bias ``Add`` and a table
    ``Add`` per covariate would each be one more pass over samples x cells x outputs. With many
    categories (10,000 batches) the covariates stay table gathers (a wider product would cost
    more than the passes).
    """

    def __init__(self, fc, n_in: int, max_onehot: int = 64):
        super().__init__()
        (parts,) = fold_fc_layers(fc, [n_in])
        if parts.layer_norm_eps is not None or parts.activation is not None:
            raise UnsupportedModelError("WideHead: a head with layer norm or an activation")
        n_cols = sum(t.shape[0] for _, t in parts.cat_tables)
        self.onehot = n_cols <= max_onehot
        blocks = [parts.weight.T]
        self.cat_pos = [p for p, _ in parts.cat_tables]
        eyes, tables = [], []
        for _, t in parts.cat_tables:
            if self.onehot:
                blocks.append(t)
                eyes.append(torch.eye(t.shape[0], dtype=torch.float32))
            else:
                tables.append(t.float())
        blocks.append(parts.bias[None, :])
        self.weight = nn.Parameter(torch.cat(blocks, 0).float().contiguous(), requires_grad=False)
        self.eyes = nn.ParameterList([nn.Parameter(e, requires_grad=False) for e in eyes])
        self.tables = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tables])

    def forward(self, x: torch.Tensor, cats: list[torch.Tensor]) -> torch.Tensor:
        cols = [x]
        if self.onehot:
            for pos, eye in zip(self.cat_pos, self.eyes, strict=True):
                oh = eye[cats[pos]]  # (N, n_cat)
                cols.append(oh.unsqueeze(0).expand(x.shape[0], -1, -1) if x.dim() == 3 else oh)
        cols.append(torch.ones_like(x[..., :1]))
        y = torch.cat(cols, dim=-1) @ self.weight
        if not self.onehot:
            for pos, table in zip(self.cat_pos, self.tables, strict=True):
                y = y + table[cats[pos]]
        return y
