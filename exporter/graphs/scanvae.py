"""SCANVAE's classifier, ``encoder_z2_z1`` and ``decoder_z1_z2``.

The last two evaluate every label at once (a label axis instead of scvi-tools'
``broadcast_labels`` repeat: the label's one-hot column becomes a (K, out) table added on it).
"""

from __future__ import annotations

import torch
from torch import nn

from scvi_onnx.errors import UnsupportedModelError

from .layers import FoldedFC, LayerParts, copy_linear, fold_fc_layers, var_activation_name


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
        self.out = copy_linear(layers[0])
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
    """``act?(layer_norm?(x @ W.T + b + T))``: ``T`` (K, out) adds label k's one-hot column."""

    def __init__(self, parts: LayerParts):
        super().__init__()
        self.weight_t = nn.Parameter(parts.weight.T.contiguous().float(), requires_grad=False)
        self.bias = nn.Parameter(parts.bias.float(), requires_grad=False)
        self.table = (
            nn.Parameter(parts.cat_tables[0][1].float(), requires_grad=False)
            if parts.cat_tables
            else None
        )
        self.ln_eps = parts.layer_norm_eps
        self.act = parts.activation
        self.n_out = parts.weight.shape[0]

    def forward(self, x):
        y = torch.matmul(x, self.weight_t) + self.bias
        if self.table is not None:
            y = y + self.table  # (..., K, out) + (K, out): label k on axis -2
        if self.ln_eps is not None:
            y = nn.functional.layer_norm(y, (self.n_out,), eps=self.ln_eps)
        if self.act is not None:
            y = self.act(y)
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
        self.layers = nn.ModuleList([_LabelBroadcastLayer(p) for p in fold_fc_layers(fc, dims)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Z2EncoderGraph(nn.Module):
    """``encoder_z2_z1`` for every label: z1 (S, N, L) -> qz2_m, qz2_v (S, N, K, L)."""

    def __init__(self, encoder, n_latent: int, n_labels: int):
        super().__init__()
        self.fc = _LabelBroadcastFC(encoder.encoder, n_latent, n_labels)
        self.mean = copy_linear(encoder.mean_encoder)
        self.var = copy_linear(encoder.var_encoder)
        self.var_eps = float(encoder.var_eps)
        self.var_act = var_activation_name(encoder)
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
        self.mean = copy_linear(decoder.mean_decoder)
        self.var = copy_linear(decoder.var_decoder)

    def forward(self, z2):
        p = self.fc(z2)
        return self.mean(p), torch.exp(self.var(p))
