"""The bundle format: file names, graph IO names, array names, probe names, schema version.

One home for every name both halves use: the exporter writes what is declared here, the
runtime reads it. A bundle folder holds:

``manifest.json``
    schema version, model class, config, genes, registry, graph IO names, versions, sha256 of
    every other file (see :mod:`scvi_onnx.bundle.manifest`).
``encoder.onnx`` / ``decoder.onnx``
    float32 graphs with a dynamic cell axis; no randomness, no BatchNormalization node.
``scorer.onnx`` (optional)
    the decoder followed by ``log p(x | z)`` summed over genes, for devices where decoder
    outputs should stay on the device (CUDA).
``depth.onnx`` (PEAKVI with ``model_depth``)
    the depth factor ``d`` of each cell (the latent space does not need it, so it is a graph of
    its own); PEAKVI's decoder gives the accessibility probability ``px`` of every region (the
    model's "genes").
``encoder_sparse.onnx``, ``depth_sparse.onnx`` (optional; PEAKVI on many regions)
    the encoder and the depth encoder after their first layer's product over the regions,
    ``x_w = x @ W`` (``x_w`` (N, H) in, the same outputs): on the CPU the runtime computes
    ``x_w`` from the non-zero entries (scATAC input is a few percent non-zero), ``W`` read
    from the full graph's file (its initializer named in the manifest: never stored twice).
``classifier.onnx``, ``z2_encoder.onnx``, ``z1_decoder.onnx`` (SCANVI)
    the classifier ``q(y | z1)``, ``q(z2 | z1, y)`` and ``p(z1 | z2, y)`` for every label.
``arrays.npz``
    parameters the numpy side needs (dispersion, library-size prior, label prior, loadings,
    PEAKVI's region factors);
    loaded with ``allow_pickle=False``.
``probes.npz``
    probe inputs and the exporter's torch outputs for them, for ``verify``
    (names: :func:`probe_name`).
"""

from __future__ import annotations

SCHEMA_VERSION = 1
#: Oldest schema version this runtime still reads.
MIN_SCHEMA_VERSION = 1
FORMAT_NAME = "scvi-onnx-bundle"
OPSET = 17

MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
SCORER_FILE = "scorer.onnx"
CLASSIFIER_FILE = "classifier.onnx"
Z2_ENCODER_FILE = "z2_encoder.onnx"
Z1_DECODER_FILE = "z1_decoder.onnx"
DEPTH_FILE = "depth.onnx"
ENCODER_SPARSE_FILE = "encoder_sparse.onnx"
DEPTH_SPARSE_FILE = "depth_sparse.onnx"
ARRAYS_FILE = "arrays.npz"
PROBES_FILE = "probes.npz"

#: Files every bundle lists with their sha256: the runtime reads each of them, so none may be
#: loaded unchecked (graph files named in ``graphs`` are required as well).
REQUIRED_FILES = (ENCODER_FILE, DECODER_FILE, ARRAYS_FILE, PROBES_FILE)

# ---- graph input / output names ---------------------------------------------------------
IN_X = "x"
#: Encoder input of models with ``log_variational`` (exporters from 0.2): ``log1p(counts)``,
#: computed by the runtime in numpy (ONNX Runtime's CPU ``Log`` kernel is ~5x slower than
#: numpy's ``log1p``). Bundles whose encoder takes ``x`` apply ``log1p`` inside the graph.
IN_X_LOG1P = "x_log1p"
IN_CONT = "cont_covs"
IN_BATCH = "batch_index"
IN_CAT = "cat_covs"
IN_Z = "z"
IN_LIBRARY = "library"
OUT_QZ_M = "qz_m"
OUT_QZ_V = "qz_v"
OUT_QL_M = "ql_m"
OUT_QL_V = "ql_v"
OUT_PX_RATE = "px_rate"
OUT_PX_R = "px_r"
OUT_PX_DROPOUT = "px_dropout"
# scorer.onnx: decoder inputs + counts (N, G) [+ labels (N, 1)] -> log_px (S, N), the sum of
# log p(x | z) over genes without the count terms (the runtime adds their per-cell sums).
IN_COUNTS = "counts"
IN_LABELS = "labels"
OUT_LOG_PX = "log_px"
# SCANVI graphs (no randomness; the runtime draws z2):
#   classifier.onnx  z (S, N, L) -> probs (S, N, K)          softmax of the classifier
#   z2_encoder.onnx  z (S, N, L) -> qz2_m, qz2_v (S, N, K, L) q(z2 | z1, y) for every label y
#   z1_decoder.onnx  z2 (S, N, K, L) -> pz1_m, pz1_v          p(z1 | z2, y), label y on axis 2
IN_Z2 = "z2"
OUT_PROBS = "probs"
OUT_QZ2_M = "qz2_m"
OUT_QZ2_V = "qz2_v"
OUT_PZ1_M = "pz1_m"
OUT_PZ1_V = "pz1_v"
# TOTALVI graphs (no randomness; the runtime draws z, the library and the protein background):
#   encoder.onnx  xy_norm (N, G + P) [+ covariates] -> qz_m, qz_v [, ql_m, ql_v]
#                 xy_norm = log(1 + x / (1 + mean_g x)) | log(1 + y / (1 + mean_p y))
#                 (without the logs when the model was trained without log_variational)
#   decoder.onnx  z (S, N, L), library (S|1, N, 1) (the library size itself, not its log)
#                 [+ covariates] -> px_rate [, px_dropout], py_back_alpha, py_back_beta,
#                 py_fore_scale, py_mixing (S, N, P): the protein background's posterior
#                 N(alpha, beta) (its draw is the runtime's), the foreground scale and the
#                 background mixing logits
IN_XY_NORM = "xy_norm"
OUT_PY_BACK_ALPHA = "py_back_alpha"
OUT_PY_BACK_BETA = "py_back_beta"
OUT_PY_FORE_SCALE = "py_fore_scale"
OUT_PY_MIXING = "py_mixing"
# PEAKVI graphs:
#   encoder.onnx  x (N, R) [+ covariates] -> qz_m, qz_v
#   depth.onnx    x (N, R) [+ covariates] -> depth (N, 1)     (d of PEAKVAE, model_depth)
#   decoder.onnx  z (S, N, L) [+ covariates] -> px (S, N, R)   accessibility probability
#   scorer.onnx   decoder inputs + depth (N, 1) + counts (N, R) -> log_px (S, N)
IN_DEPTH = "depth"
OUT_DEPTH = "depth"
OUT_PX = "px"
#   encoder_sparse.onnx  x_w (N, H) [+ covariates] -> qz_m, qz_v   (the encoder after x @ W)
#   depth_sparse.onnx    x_w (N, H) [+ covariates] -> depth (N, 1)
#: The first layer's product over the regions, ``x @ W`` (the rows of ``W`` for the regions;
#: the continuous covariates' rows, the bias and the categorical tables stay in the graph).
IN_X_PRODUCT = "x_w"
#: A sparse graph's manifest entry names where ``W`` is: ``{"graph": <full graph>,
#: "initializer": <name>, "rows": <regions>}`` (``W`` is the initializer's first ``rows`` rows).
INPUT_LAYER = "input_layer"

# ---- arrays.npz ----------------------------------------------------------------------------
ARR_PX_R = "px_r"
ARR_LIB_MEANS = "library_log_means"
ARR_LIB_VARS = "library_log_vars"
#: LinearSCVI: scvi-tools' own ``get_loadings()`` values (genes x n_latent), stored at export.
ARR_LOADINGS = "loadings"
ARR_Y_PRIOR = "y_prior"
#: TOTALVI: protein dispersion (log scale, (P,) or (P, C)), the protein background prior
#: (mean and log scale, (P, n_panel)), log per-batch protein efficiency (P, n_batch), and the
#: proteins observed in each panel (n_panel, P) bool, where some were missing in training.
ARR_PY_R = "py_r"
ARR_BACK_ALPHA = "background_pro_alpha"
ARR_BACK_LOG_BETA = "background_pro_log_beta"
ARR_LOG_EFFICIENCY = "log_per_batch_efficiency"
ARR_PROTEIN_MASK = "protein_batch_mask"
#: PEAKVI: ``sigmoid(region_factors)`` as scvi-tools computes it (``get_region_factors()``).
ARR_REGION_FACTORS = "region_factors"

# ---- graphs: manifest name -> file, and probe names in probes.npz ------------------------
#: Graph name in ``manifest.graphs`` -> its default file (bundles name the file themselves).
GRAPH_FILES = {
    "encoder": ENCODER_FILE,
    "decoder": DECODER_FILE,
    "scorer": SCORER_FILE,
    "classifier": CLASSIFIER_FILE,
    "z2_encoder": Z2_ENCODER_FILE,
    "z1_decoder": Z1_DECODER_FILE,
    "depth": DEPTH_FILE,
    "encoder_sparse": ENCODER_SPARSE_FILE,
    "depth_sparse": DEPTH_SPARSE_FILE,
}
#: Graph name -> prefix of its probe arrays in probes.npz (inputs ``<prefix>_in.<name>``,
#: torch outputs ``<prefix>_out.<name>``).
PROBE_PREFIXES = {
    "encoder": "enc",
    "decoder": "dec",
    "scorer": "score",
    "classifier": "cls",
    "z2_encoder": "z2e",
    "z1_decoder": "z1d",
    "depth": "depth",
    "encoder_sparse": "encs",
    "depth_sparse": "depths",
}
#: Probe arrays that are not graph IO: each probe cell's batch and label codes, and the
#: decoder's dispersion as scvi-tools computed it (``dec_out.theta``).
PROBE_BATCH = "probe.batch"
PROBE_LABELS = "probe.labels"
PROBE_THETA = "theta"
#: TOTALVI: each probe cell's panel code, and scvi-tools' own per-cell selections that the
#: runtime makes in numpy (gene and protein dispersion, per-batch protein efficiency, the
#: protein background prior), checked at export.
PROBE_PANEL = "probe.panel"
PROBE_TOTALVI = {
    "theta": "totalvi.px_theta",
    "py_theta": "totalvi.py_theta",
    "efficiency": "totalvi.efficiency",
    "prior_alpha": "totalvi.back_prior_alpha",
    "prior_beta": "totalvi.back_prior_beta",
}


def probe_name(graph: str, io: str, name: str) -> str:
    """The probes.npz name of graph input (``io="in"``) or torch output (``"out"``) ``name``."""
    if io not in ("in", "out"):
        raise ValueError(f"io must be 'in' or 'out', got {io!r}")
    return f"{PROBE_PREFIXES[graph]}_{io}.{name}"


# ---- numbers ---------------------------------------------------------------------------------
#: Numerical constants of scvi-tools 1.4.2 that the maths depends on.
LIKELIHOOD_EPS = 1e-8  # scvi.distributions: eps inside logs
#: torch's ``binary_cross_entropy`` clamps each log at this value (PEAKVI's likelihood).
BCE_LOG_MIN = -100.0
VAR_EPS = 1e-4  # scvi.nn.Encoder: q_v = exp(.) + var_eps
#: scvi.nn.DecoderTOTALVI: py_back_beta = activation(.) + 1e-8; EncoderTOTALVI clamps the
#: log-library draw at 15 before exp; TOTALVAE.loss weighs log p(mixing = background) 1e-3.
BACK_BETA_EPS = 1e-8
LOG_LIBRARY_MAX = 15.0
PROTEIN_EXPRESSED_WEIGHT = 1e-3
#: Default export-validation tolerances (float32 graphs vs torch float32 modules).
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
#: The manifest's ``validation`` key for outputs accepted within their float32 rounding spread
#: (a model with large activations): ``{"graph.output": {"atol": ..., "rtol": ...}}``, the
#: tolerance each passed with at export and ``verify`` applies (absent: the global one).
VALIDATION_WIDENED = "widened"
