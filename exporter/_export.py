"""Export a trained scvi-tools SCVI, LinearSCVI or SCANVI model to a scvi-onnx bundle."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scvi_onnx import bundle as B
from scvi_onnx.errors import ExportValidationError, UnsupportedModelError
from scvi_onnx.selfcheck import deviation

from ._graphs import (
    ClassifierGraph,
    DecoderGraph,
    EncoderGraph,
    GraphSpec,
    LinearDecoderGraph,
    ScoreGraph,
    Z1DecoderGraph,
    Z2EncoderGraph,
)

logger = logging.getLogger(__name__)

SUPPORTED_MODELS = {"SCVI": "VAE", "LinearSCVI": "LDVAE", "SCANVI": "SCANVAE"}
N_SYNTHETIC_PROBES = 24
N_REAL_PROBES = 16
N_PROBE_SAMPLES = 2


# ----------------------------------------------------------------------------- model loading
def _load_model(model: Any, adata: Any = None):
    """A model instance, or a saved scvi-tools model folder of any scvi-tools version >= 0.8."""
    if isinstance(model, (str, os.PathLike)):
        from ._legacy import load_saved_model

        # model.pt / attr.pkl are pickles: export only trusted folders (see README).
        return load_saved_model(model, adata, supported=SUPPORTED_MODELS)
    return model


def _check_supported(model) -> None:
    cls = type(model).__name__
    if cls not in SUPPORTED_MODELS:
        raise UnsupportedModelError(
            f"cannot export a {cls}: supported model classes are {sorted(SUPPORTED_MODELS)}"
        )
    mod = type(model.module).__name__
    if mod != SUPPORTED_MODELS[cls]:
        raise UnsupportedModelError(f"{cls} with module {mod} is not supported")
    if mod == "LDVAE":
        _check_ldvae(model.module)
    elif mod == "SCANVAE":
        _check_scanvae(model.module)
    if not getattr(model, "is_trained_", True):
        warnings.warn("exporting a model that was never trained", UserWarning, stacklevel=3)


def _check_ldvae(m) -> None:
    if m.batch_representation != "one-hot":
        raise UnsupportedModelError(
            "LinearSCVI with batch_representation='embedding' is not supported (scvi-tools' "
            "LinearDecoderSCVI takes the latent only; the embedding would not fit its input)"
        )
    if m.dispersion == "gene-cell":
        raise UnsupportedModelError(
            "LinearSCVI with dispersion='gene-cell' is not supported: LinearDecoderSCVI has no "
            "dispersion head (scvi-tools 1.4.2 itself fails on it)"
        )
    if m.dispersion == "gene-label" and m.px_r.shape[-1] == 0:
        raise UnsupportedModelError(
            "LinearSCVI with dispersion='gene-label' is not supported: scvi-tools 1.4.2 builds "
            "LDVAE with n_labels=0 (unless passed), so the dispersion has no label columns and "
            "scvi-tools itself fails on it"
        )


def _check_scanvae(m) -> None:
    if getattr(m, "use_labels_groups", False):
        raise UnsupportedModelError("SCANVI with use_labels_groups=True is not supported")
    if m.dispersion == "gene-label":
        raise UnsupportedModelError(
            "SCANVI with dispersion='gene-label' is not supported: scvi-tools 1.4.2 one-hot "
            "encodes the label over the known labels only, so it fails on every cell of the "
            "unlabeled category"
        )
    if m.batch_representation == "embedding" and m.encode_covariates:
        raise UnsupportedModelError(
            "SCANVI with batch_representation='embedding' and encode_covariates=True is not "
            "supported: scvi-tools 1.4.2's classify() feeds the encoder without the batch "
            "embedding and fails (predict and the classification loss)"
        )


# ----------------------------------------------------------------------------- manifest parts
def _field(registry: dict, key: str) -> dict:
    return registry["field_registries"].get(key, {}) or {}


def _categories(values) -> list:
    out = []
    for v in list(values):
        if isinstance(v, (np.generic,)):
            v = v.item()
        out.append(v if isinstance(v, (str, int, float, bool)) else str(v))
    return out


def _registry(model) -> B.Registry:
    reg = model.registry_
    x = _field(reg, "X")
    layer = x.get("data_registry", {}).get("attr_key")

    def cat_field(key: str, internal: str) -> B.CategoricalField:
        f = _field(reg, key)
        st = f.get("state_registry", {})
        original = st.get("original_key")
        mapping = st.get("categorical_mapping", [0])
        user_key = None if original in (None, internal) else original
        return B.CategoricalField(key=user_key, categories=tuple(_categories(mapping)))

    sf = _field(reg, "size_factor").get("data_registry", {})
    size_factor_key = sf.get("attr_key") if sf else None
    cat_st = _field(reg, "extra_categorical_covs").get("state_registry", {})
    cats = tuple(
        B.CategoricalField(key=k, categories=tuple(_categories(cat_st["mappings"][k])))
        for k in cat_st.get("field_keys", [])
    )
    cont_st = _field(reg, "extra_continuous_covs").get("state_registry", {})
    conts = tuple(str(c) for c in cont_st.get("columns", []))
    return B.Registry(
        layer=layer,
        batch=cat_field("batch", "_scvi_batch"),
        labels=cat_field("labels", "_scvi_labels"),
        size_factor_key=size_factor_key,
        categorical_covariates=cats,
        continuous_covariates=conts,
    )


def _genes(model) -> list[str]:
    st = _field(model.registry_, "X").get("state_registry", {})
    names = st.get("column_names")
    if names is None:
        names = model.adata.var_names
    return [str(g) for g in list(names)]


def _norm_placement(fc) -> dict[str, bool]:
    seq = fc.fc_layers[0]
    return {"batch_norm": seq[1] is not None, "layer_norm": seq[2] is not None}


def _config(model, registry: B.Registry) -> dict[str, Any]:
    m = model.module
    linear = type(m).__name__ == "LDVAE"
    dec_fc = m.decoder.factor_regressor if linear else m.decoder.px_decoder
    enc_norm = _norm_placement(m.z_encoder.encoder)
    dec_norm = _norm_placement(dec_fc)
    n_cats = [c.n_categories for c in registry.categorical_covariates]
    config = {
        "module_class": type(m).__name__,
        "n_input": int(m.n_input),
        "n_latent": int(m.n_latent),
        "n_hidden": int(m.n_hidden),
        "n_layers": int(m.n_layers),
        "n_batch": int(m.n_batch),
        "n_labels": int(m.n_labels),
        "n_continuous_cov": len(registry.continuous_covariates),
        "n_cats_per_cov": n_cats,
        "gene_likelihood": m.gene_likelihood,
        "dispersion": m.dispersion,
        "latent_distribution": m.latent_distribution,
        "log_variational": bool(m.log_variational),
        "use_observed_lib_size": bool(m.use_observed_lib_size),
        "use_size_factor_key": bool(m.use_size_factor_key),
        # LDVAE replaces the encoders by ones that never see covariates.
        "encode_covariates": bool(m.encode_covariates) and not linear,
        "deeply_inject_covariates": bool(dec_fc.inject_covariates),
        "batch_representation": m.batch_representation,
        "encoder_batch_norm": enc_norm["batch_norm"],
        "encoder_layer_norm": enc_norm["layer_norm"],
        "decoder_batch_norm": dec_norm["batch_norm"],
        "decoder_layer_norm": dec_norm["layer_norm"],
        "var_eps": float(m.z_encoder.var_eps),
        "likelihood_eps": B.LIKELIHOOD_EPS,
    }
    if linear:
        config["decoder_bias"] = dec_fc.fc_layers[0][0].bias is not None
    if type(m).__name__ == "SCANVAE":
        st = _field(model.registry_, "labels").get("state_registry", {})
        unlabeled = st.get("unlabeled_category")
        cls_layers = list(m.classifier.classifier)
        config |= {
            "unlabeled_category": _categories([unlabeled])[0] if unlabeled is not None else None,
            "classifier_logits": bool(m.classifier.logits),
            "classifier_n_layers": (
                len(cls_layers[0].fc_layers) if hasattr(cls_layers[0], "fc_layers") else 0
            ),
        }
    return config


def _specs(config: dict[str, Any]) -> tuple[GraphSpec, GraphSpec]:
    uses_batch = config["batch_representation"] == "embedding" or (
        config["batch_representation"] == "one-hot" and config["n_batch"] > 1
    )
    uses_cats = any(n > 1 for n in config["n_cats_per_cov"])
    uses_cont = config["n_continuous_cov"] > 0
    enc_in = [B.IN_X_LOG1P if config["log_variational"] else B.IN_X]
    if config["encode_covariates"]:
        enc_in += [B.IN_CONT] * uses_cont + [B.IN_BATCH] * uses_batch + [B.IN_CAT] * uses_cats
    enc_out = [B.OUT_QZ_M, B.OUT_QZ_V]
    if not config["use_observed_lib_size"]:
        enc_out += [B.OUT_QL_M, B.OUT_QL_V]
    dec_in = [B.IN_Z, B.IN_LIBRARY]
    dec_in += [B.IN_CONT] * uses_cont + [B.IN_BATCH] * uses_batch + [B.IN_CAT] * uses_cats
    dec_out = [B.OUT_PX_RATE]
    if config["dispersion"] == "gene-cell":
        dec_out.append(B.OUT_PX_R)
    if config["gene_likelihood"] == "zinb":
        dec_out.append(B.OUT_PX_DROPOUT)
    return GraphSpec(tuple(enc_in), tuple(enc_out)), GraphSpec(tuple(dec_in), tuple(dec_out))


def _arrays(model) -> dict[str, np.ndarray]:
    m = model.module
    out: dict[str, np.ndarray] = {}
    if m.dispersion != "gene-cell":
        out[B.ARR_PX_R] = m.px_r.detach().cpu().numpy().astype(np.float32)
    if not m.use_observed_lib_size:
        out[B.ARR_LIB_MEANS] = m.library_log_means.detach().cpu().numpy().astype(np.float32)
        out[B.ARR_LIB_VARS] = m.library_log_vars.detach().cpu().numpy().astype(np.float32)
    if type(m).__name__ == "SCANVAE":
        out[B.ARR_Y_PRIOR] = m.y_prior.detach().cpu().numpy().reshape(-1).astype(np.float32)
    return out


def _loadings(model, genes: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """scvi-tools' own ``LinearSCVI.get_loadings()``: its values, columns and index name.

    Without an AnnData (a folder loaded from its registry only) scvi-tools' method cannot run
    (it reads ``adata.var_names``); the same values come from ``module.get_loadings()`` with the
    registered gene names and the columns ``Z_0..Z_{L-1}`` scvi-tools uses.
    """
    if getattr(model, "adata", None) is not None:
        df = model.get_loadings()
        values = df.to_numpy()
        if [str(g) for g in df.index] != genes:
            raise UnsupportedModelError("get_loadings() rows differ from the registered genes")
        name = df.index.name
        meta = {
            "columns": _categories(df.columns),
            "index_name": None if name is None else str(name),
        }
    else:
        values = model.module.get_loadings()
        meta = {"columns": [f"Z_{i}" for i in range(values.shape[1])], "index_name": None}
    return np.ascontiguousarray(values, dtype=np.float32), meta


def _embedding_weight(model):
    m = model.module
    if m.batch_representation != "embedding":
        return None
    return m.get_embedding("batch").weight


# ----------------------------------------------------------------------------- probes
def _probe_tensors(model, registry: B.Registry, config: dict, rng: np.random.Generator):
    """Probe cells: synthetic ones covering the covariates, plus real ones when available."""
    n, g = N_SYNTHETIC_PROBES, config["n_input"]
    lib = rng.uniform(200, 5000, size=(n, 1))
    p = rng.dirichlet(np.full(g, 0.3), size=n)
    x = rng.poisson(lib * p).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1.0
    t: dict[str, np.ndarray] = {
        "X": x,
        "batch": (np.arange(n) % max(config["n_batch"], 1)).reshape(-1, 1).astype(np.int64),
        "labels": (np.arange(n) % max(config["n_labels"], 1)).reshape(-1, 1).astype(np.int64),
    }
    if registry.categorical_covariates:
        t["extra_categorical_covs"] = np.stack(
            [rng.integers(0, c.n_categories, n) for c in registry.categorical_covariates], 1
        ).astype(np.int64)
    if registry.continuous_covariates:
        t["extra_continuous_covs"] = rng.normal(
            size=(n, len(registry.continuous_covariates))
        ).astype(np.float32)
    if registry.size_factor_key:
        t["size_factor"] = rng.uniform(0.3, 3.0, size=(n, 1)).astype(np.float32)
    adata = getattr(model, "adata", None)
    if adata is not None and adata.n_obs > 0:
        k = min(N_REAL_PROBES, adata.n_obs)
        dl = model._make_data_loader(adata=adata, indices=np.arange(k), batch_size=k)
        real = next(iter(dl))
        keep = real["X"].sum(1) > 0
        for key in t:
            if key in real:
                t[key] = np.concatenate(
                    [t[key], real[key][keep].cpu().numpy().astype(t[key].dtype)]
                )
    return t


def _to_torch(t: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(device) for k, v in t.items()}


def _feeds(spec: GraphSpec, t: dict[str, np.ndarray], extra: dict[str, np.ndarray]):
    src = {
        B.IN_X: t["X"],
        B.IN_X_LOG1P: np.log1p(t["X"]) if B.IN_X_LOG1P in spec.inputs else None,
        B.IN_BATCH: t["batch"],
        B.IN_CAT: t.get("extra_categorical_covs"),
        B.IN_CONT: t.get("extra_continuous_covs"),
        **extra,
    }
    return {name: np.ascontiguousarray(src[name]) for name in spec.inputs}


@contextlib.contextmanager
def _module_eval(module):
    """Run the user's module in eval mode, then restore every submodule's train/eval flag."""
    modes = {name: sub.training for name, sub in module.named_modules()}
    with torch.inference_mode():
        module.eval()
        try:
            yield
        finally:
            for name, sub in module.named_modules():
                sub.train(modes[name])


def _scorer_graph(dec_graph, dec_spec, dec_feeds, dec_ref, config, arrays, t):
    """The scoring graph (decoder + log p(x | z) summed over genes, without count terms), its
    feeds, and its reference: the float64 formulas of ``scvi_onnx.distributions`` on
    scvi-tools' own decoder outputs, less the count terms."""
    from scipy.special import gammaln

    from scvi_onnx.maths import distributions as D

    lik = config["gene_likelihood"]
    inputs = [*dec_spec.inputs, B.IN_COUNTS]
    if config["dispersion"] == "gene-label" and config["n_labels"] > 1:
        inputs.append(B.IN_LABELS)
    spec = GraphSpec(tuple(inputs), (B.OUT_LOG_PX,))
    graph = ScoreGraph(dec_graph, spec, config, arrays.get(B.ARR_PX_R))
    feeds = {**dec_feeds, B.IN_COUNTS: t["X"]}
    if B.IN_LABELS in inputs:
        feeds[B.IN_LABELS] = t["labels"]
    x = t["X"].astype(np.float64)
    mu = dec_ref[B.OUT_PX_RATE].astype(np.float64)
    if lik == "poisson":
        full, counts = D.log_poisson(x, mu), -gammaln(x + 1.0)
    elif lik == "normal":
        full, counts = D.log_normal(x, mu, dec_ref["theta"].astype(np.float64)), 0.0
    else:
        theta = dec_ref["theta"].astype(np.float64)
        if lik == "nb":
            full = D.log_nb_positive(x, mu, theta)
            mask = x != 0
        else:
            full = D.log_zinb_positive(x, mu, theta, dec_ref[B.OUT_PX_DROPOUT].astype(np.float64))
            mask = x > B.LIKELIHOOD_EPS
        counts = np.where(mask, gammaln(x + theta) - gammaln(theta) - gammaln(x + 1.0), 0.0)
    ref = {B.OUT_LOG_PX: (full - counts).sum(-1)}
    return ("scorer", B.SCORER_FILE, graph, spec, feeds, ref, "score_in.", "score_out.")


def _torch_reference(model, config, t, rng):
    """scvi-tools' own modules on the probes: encoder outputs and decoder outputs."""
    m = model.module
    device = next(m.parameters()).device
    tt = _to_torch(t, device)
    with _module_eval(m):
        inf = m.inference(**m._get_inference_input(tt))
        qz_m = inf["qz"].loc
        qz_v = inf["qz"].scale.square()
        enc = {B.OUT_QZ_M: qz_m, B.OUT_QZ_V: qz_v}
        if inf.get("ql") is not None:
            enc[B.OUT_QL_M] = inf["ql"].loc
            enc[B.OUT_QL_V] = inf["ql"].scale.square()
        n = qz_m.shape[0]
        eps = rng.standard_normal((N_PROBE_SAMPLES, n, config["n_latent"])).astype(np.float32)
        z = qz_m[None] + torch.as_tensor(eps, device=device) * qz_v.sqrt()[None]
        if config["latent_distribution"] == "ln":
            z = torch.softmax(z, dim=-1)
        if config["use_size_factor_key"]:
            library = torch.log(tt["size_factor"])[None].expand(N_PROBE_SAMPLES, -1, -1)
        elif config["use_observed_lib_size"]:
            library = torch.log(tt["X"].sum(1, keepdim=True))[None].expand(N_PROBE_SAMPLES, -1, -1)
        else:
            le = rng.standard_normal((N_PROBE_SAMPLES, n, 1)).astype(np.float32)
            library = (
                enc[B.OUT_QL_M][None]
                + torch.as_tensor(le, device=device) * enc[B.OUT_QL_V].sqrt()[None]
            )
        gen_in = m._get_generative_input(tt, {"z": z[0], "library": library[0]})
        dec: dict[str, list] = {}
        for s in range(N_PROBE_SAMPLES):
            gen_in["z"], gen_in["library"] = z[s], library[s]
            if config["use_size_factor_key"]:
                gen_in["size_factor"] = library[s]
            px = m.generative(**gen_in)["px"]
            lik = config["gene_likelihood"]
            rate = px.rate if lik == "poisson" else (px.loc if lik == "normal" else px.mu)
            dec.setdefault(B.OUT_PX_RATE, []).append(rate)
            theta = px.scale if lik == "normal" else getattr(px, "theta", None)
            if theta is not None:
                dec.setdefault("theta", []).append(theta.expand_as(rate))
            if lik == "zinb":
                dec.setdefault(B.OUT_PX_DROPOUT, []).append(px.zi_logits)
    to_np = lambda v: v.detach().cpu().numpy().astype(np.float32)  # noqa: E731
    enc_np = {k: to_np(v) for k, v in enc.items()}
    dec_np = {k: to_np(torch.stack(v)) for k, v in dec.items()}
    return enc_np, dec_np, to_np(z), to_np(library)


def _scanvi_graphs(model, config: dict, z: np.ndarray, rng: np.random.Generator) -> list:
    """SCANVAE's classifier, ``encoder_z2_z1`` and ``decoder_z1_z2``: graphs, probes, references.

    The references are scvi-tools' own modules run as ``SCANVAE.loss`` runs them: on the probe
    z (S, N, L), each label broadcast with ``broadcast_labels`` (rows ``k * N + i``), regrouped
    here to (S, N, K, L). z2 is drawn from the torch ``q(z2 | z1, y)`` with numpy noise.
    """
    from scvi.module._utils import broadcast_labels

    m = model.module
    n_s, n, n_lat = z.shape
    k = int(config["n_labels"])
    cls_graph = ClassifierGraph(m.classifier, n_lat)
    z2e_graph = Z2EncoderGraph(m.encoder_z2_z1, n_lat, k)
    z1d_graph = Z1DecoderGraph(m.decoder_z1_z2, n_lat, k)
    eps = rng.standard_normal((n_s, n, k, n_lat)).astype(np.float32)
    device = next(m.parameters()).device
    cuda = [device.index or 0] if device.type == "cuda" else []
    ref: dict[str, list] = {}
    # encoder_z2_z1 draws a sample: keep the user's (CUDA) RNG as found.
    with _module_eval(m), torch.random.fork_rng(devices=cuda):
        zt = torch.as_tensor(z, device=device)
        probs = m.classifier(zt)
        if m.classifier.logits:
            probs = torch.softmax(probs, dim=-1)
        for s in range(n_s):
            ys, z1s = broadcast_labels(zt[s], n_broadcast=k)
            qz2, _ = m.encoder_z2_z1(z1s, ys)

            def regroup(v):  # (K * N, L) -> (N, K, L)
                return v.reshape(k, n, n_lat).transpose(0, 1)

            qm, qv = regroup(qz2.loc), regroup(qz2.scale.square())
            z2 = qm + torch.as_tensor(eps[s], device=device) * qv.sqrt()
            pm, pv = m.decoder_z1_z2(z2.transpose(0, 1).reshape(k * n, n_lat), ys)
            for key, v in (
                (B.OUT_QZ2_M, qm),
                (B.OUT_QZ2_V, qv),
                (B.IN_Z2, z2),
                (B.OUT_PZ1_M, regroup(pm)),
                (B.OUT_PZ1_V, regroup(pv)),
            ):
                ref.setdefault(key, []).append(v)
    to_np = lambda v: np.ascontiguousarray(v.detach().cpu().numpy().astype(np.float32))  # noqa: E731
    st = {key: to_np(torch.stack(v)) for key, v in ref.items()}
    cls_spec = GraphSpec((B.IN_Z,), (B.OUT_PROBS,))
    z2e_spec = GraphSpec((B.IN_Z,), (B.OUT_QZ2_M, B.OUT_QZ2_V))
    z1d_spec = GraphSpec((B.IN_Z2,), (B.OUT_PZ1_M, B.OUT_PZ1_V))
    p = {g: (B.probe_name(g, "in", ""), B.probe_name(g, "out", "")) for g in B.PROBE_PREFIXES}
    return [
        (
            "classifier",
            B.CLASSIFIER_FILE,
            cls_graph,
            cls_spec,
            {B.IN_Z: z},
            {B.OUT_PROBS: to_np(probs)},
            *p["classifier"],
        ),
        (
            "z2_encoder",
            B.Z2_ENCODER_FILE,
            z2e_graph,
            z2e_spec,
            {B.IN_Z: z},
            {B.OUT_QZ2_M: st[B.OUT_QZ2_M], B.OUT_QZ2_V: st[B.OUT_QZ2_V]},
            *p["z2_encoder"],
        ),
        (
            "z1_decoder",
            B.Z1_DECODER_FILE,
            z1d_graph,
            z1d_spec,
            {B.IN_Z2: st[B.IN_Z2]},
            {B.OUT_PZ1_M: st[B.OUT_PZ1_M], B.OUT_PZ1_V: st[B.OUT_PZ1_V]},
            *p["z1_decoder"],
        ),
    ]


# ----------------------------------------------------------------------------- tracing
def _trace(
    graph: torch.nn.Module,
    spec: GraphSpec,
    feeds: dict[str, np.ndarray],
    path: Path,
    dynamic: dict[str, dict[int, str]],
) -> None:
    args = tuple(torch.as_tensor(feeds[name]) for name in spec.inputs)
    graph.eval()
    buf = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes={k: v for k, v in dynamic.items() if k in spec.inputs + spec.outputs},
            opset_version=B.OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    bad = [n.op_type for n in proto.graph.node if n.op_type in ("BatchNormalization", "Dropout")]
    if bad or any(n.op_type.startswith("Random") for n in proto.graph.node):
        raise ExportValidationError(f"{path.name} contains forbidden nodes: {bad}")
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if names_in != list(spec.inputs) or names_out != list(spec.outputs):
        raise ExportValidationError(
            f"{path.name}: graph IO {names_in} -> {names_out} differs from the spec "
            f"{list(spec.inputs)} -> {list(spec.outputs)}"
        )


def _dynamic_axes() -> dict[str, dict[int, str]]:
    cells = {0: "n_cells"}
    return {
        B.IN_X: cells,
        B.IN_X_LOG1P: cells,
        B.IN_COUNTS: cells,
        B.IN_LABELS: cells,
        B.OUT_LOG_PX: {0: "n_samples", 1: "n_cells"},
        B.IN_CONT: cells,
        B.IN_BATCH: cells,
        B.IN_CAT: cells,
        B.OUT_QZ_M: cells,
        B.OUT_QZ_V: cells,
        B.OUT_QL_M: cells,
        B.OUT_QL_V: cells,
        B.IN_Z: {0: "n_samples", 1: "n_cells"},
        B.IN_LIBRARY: {0: "n_lib_samples", 1: "n_cells"},
        B.OUT_PX_RATE: {0: "n_samples", 1: "n_cells"},
        B.OUT_PX_R: {0: "n_samples", 1: "n_cells"},
        B.OUT_PX_DROPOUT: {0: "n_samples", 1: "n_cells"},
        B.OUT_PROBS: {0: "n_samples", 1: "n_cells"},
        B.OUT_QZ2_M: {0: "n_samples", 1: "n_cells"},
        B.OUT_QZ2_V: {0: "n_samples", 1: "n_cells"},
        B.IN_Z2: {0: "n_samples", 1: "n_cells"},
        B.OUT_PZ1_M: {0: "n_samples", 1: "n_cells"},
        B.OUT_PZ1_V: {0: "n_samples", 1: "n_cells"},
    }


# ----------------------------------------------------------------------------- public
def export_model(
    model: Any,
    path: str | os.PathLike,
    *,
    adata: Any = None,
    overwrite: bool = False,
    atol: float = B.DEFAULT_ATOL,
    rtol: float = B.DEFAULT_RTOL,
    seed: int = 0,
) -> Path:
    """Export a trained scvi-tools model to a scvi-onnx bundle folder.

    Parameters
    ----------
    model
        A trained :class:`scvi.model.SCVI`, or the path of a folder written by ``model.save()``
        (``model.pt`` is a pickle: export only folders you trust).
    path
        Bundle folder to write. Written to a temporary folder first, then renamed.
    adata
        AnnData to load a saved folder with (optional; the saved registry is enough).
    overwrite
        Replace an existing bundle folder at ``path``.
    atol, rtol
        Validation tolerance of the ONNX graphs against the torch modules on probe cells:
        every output must satisfy ``|onnx - torch| <= atol + rtol * |torch|``.
    seed
        Seed of the probe cells and noise (the export is deterministic for a given seed).

    Returns
    -------
    The bundle path.

    Raises
    ------
    UnsupportedModelError
        The model uses an option the exporter cannot reproduce.
    ExportValidationError
        The exported graphs do not reproduce the torch modules within tolerance.
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (or --overwrite) to replace it")
    # Nothing here may advance the user's torch RNG (building nn.Linear modules would).
    with torch.random.fork_rng(devices=[]):
        return _export(
            model, out, adata=adata, overwrite=overwrite, atol=atol, rtol=rtol, seed=seed
        )


def _export(model, out: Path, *, adata, overwrite, atol, rtol, seed) -> Path:
    import onnx
    import onnxruntime as ort
    import scvi

    model = _load_model(model, adata)
    _check_supported(model)
    registry = _registry(model)
    genes = _genes(model)
    config = _config(model, registry)
    if len(genes) != config["n_input"]:
        raise UnsupportedModelError(f"{len(genes)} gene names for {config['n_input']} inputs")
    module_class = config["module_class"]
    enc_spec, dec_spec = _specs(config)
    emb = _embedding_weight(model)
    enc_graph = EncoderGraph(model.module, enc_spec, emb_weight=emb)
    if module_class == "LDVAE":
        dec_graph = LinearDecoderGraph(model.module, dec_spec)
    else:
        dec_graph = DecoderGraph(model.module, dec_spec, emb_weight=emb)
    arrays = _arrays(model)
    extra: dict[str, Any] = {}
    if module_class == "LDVAE":
        arrays[B.ARR_LOADINGS], extra["loadings"] = _loadings(model, genes)

    rng = np.random.default_rng(seed)
    t = _probe_tensors(model, registry, config, rng)
    enc_ref, dec_ref, z, library = _torch_reference(model, config, t, rng)
    enc_feeds = _feeds(enc_spec, t, {})
    dec_feeds = _feeds(dec_spec, t, {B.IN_Z: z, B.IN_LIBRARY: library})
    # (manifest name, file, torch graph, spec, feeds, torch reference, probe prefixes)
    graphs = [
        ("encoder", B.ENCODER_FILE, enc_graph, enc_spec, enc_feeds, enc_ref, "enc_in.", "enc_out."),
        ("decoder", B.DECODER_FILE, dec_graph, dec_spec, dec_feeds, dec_ref, "dec_in.", "dec_out."),
    ]
    if module_class == "SCANVAE":
        graphs += _scanvi_graphs(model, config, z, rng)
    elif config["dispersion"] != "gene-cell":
        graphs.append(_scorer_graph(dec_graph, dec_spec, dec_feeds, dec_ref, config, arrays, t))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for _, file, graph, spec, feeds, *_ in graphs:
            _trace(graph, spec, feeds, tmp / file, _dynamic_axes())

        # Validate: the graphs in onnxruntime against scvi-tools' modules in torch.
        from scvi_onnx.maths.dispersion import cell_dispersion

        so = ort.SessionOptions()
        so.log_severity_level = 3
        reports = []
        dec_got: dict[str, np.ndarray] = {}
        for name, file, _, spec, feeds, ref, *_ in graphs:
            sess = ort.InferenceSession(str(tmp / file), so, providers=["CPUExecutionProvider"])
            got = dict(zip(spec.outputs, sess.run(None, feeds), strict=True))
            for k in spec.outputs:
                if k in ref:
                    reports.append(asdict(deviation(f"{name}.{k}", got[k], ref[k], atol, rtol)))
            if name == "decoder":
                dec_got = got
        if "theta" in dec_ref:
            theta = cell_dispersion(
                config["dispersion"],
                arrays.get(B.ARR_PX_R),
                dec_got.get(B.OUT_PX_R),
                t["batch"],
                t["labels"],
            )
            theta = np.broadcast_to(theta, dec_ref["theta"].shape)
            reports.append(
                asdict(deviation("theta", theta.astype(np.float32), dec_ref["theta"], atol, rtol))
            )
        failed = [r for r in reports if not r["ok"]]
        if failed:
            raise ExportValidationError(
                "exported graphs do not reproduce the torch modules: "
                + "; ".join(json.dumps(r) for r in failed)
            )
        for r in reports:
            logger.info(
                "validated %s: max abs %.3g, max rel %.3g",
                r["output"],
                r.get("max_abs_diff"),
                r.get("max_rel_diff"),
            )

        np.savez(tmp / B.ARRAYS_FILE, **arrays)
        probes: dict[str, np.ndarray] = {}
        for _, _, _, _, feeds, ref, p_in, p_out in graphs:
            probes |= {f"{p_in}{k}": v for k, v in feeds.items()}
            probes |= {f"{p_out}{k}": v for k, v in ref.items()}
        probes |= {"probe.batch": t["batch"], "probe.labels": t["labels"]}
        np.savez_compressed(tmp / B.PROBES_FILE, **probes)

        from scvi_onnx import __version__

        graph_entries: dict[str, Any] = {
            name: {"file": file, "inputs": list(spec.inputs), "outputs": list(spec.outputs)}
            for name, file, _, spec, *_ in graphs
        }
        manifest = B.Manifest(
            schema_version=B.SCHEMA_VERSION,
            model_class=type(model).__name__,
            config=config,
            genes=tuple(genes),
            registry=registry,
            graphs={
                **graph_entries,
                "arrays": {"file": B.ARRAYS_FILE, "names": sorted(arrays)},
                "probes": {"file": B.PROBES_FILE},
                "opset": B.OPSET,
            },
            versions={
                "scvi_onnx": __version__,
                "scvi_tools": scvi.__version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
                "python": platform.python_version(),
            },
            validation={"atol": atol, "rtol": rtol, "seed": seed, "reports": reports},
            files={
                name: B.sha256_file(tmp / name)
                for name in (*(g[1] for g in graphs), B.ARRAYS_FILE, B.PROBES_FILE)
            },
            extra=extra,
        )
        (tmp / B.MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is a normal folder
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote bundle %s", out)
    return out
