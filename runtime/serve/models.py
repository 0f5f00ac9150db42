"""A served model: one bundle, its protocol metadata, and a request -> AnnData -> library call.

Every number a request gets is computed by the library's own public methods
(:meth:`~scvi_onnx.api.base.OnnxVAEModel.get_latent_representation`, ``get_elbo``,
``get_reconstruction_error``, ``get_marginal_ll``, SCANVI's ``predict``) on an AnnData built from
the request: the counts as ``X`` (or as the registered layer), the genes as ``var_names``, the
registered obs columns from the inputs named after them. So the gene matching, the checks, the
category mapping and the typed errors are the library's, and a request's cells get exactly the
numbers the library gives for the same cells, in the same order, with the same seed.

A cell's Monte-Carlo noise is keyed by ``first_key`` + its row in the request (request parameter
``first_key``, default 0), as the library keys a cell by its row in an AnnData: a client that
sends rows ``k .. k + n`` of a larger AnnData with ``first_key = k`` gets the numbers of those
cells in the whole (this is what :func:`scvi_onnx.connect` does).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..arguments import check_first_key, check_seed
from ..errors import InvalidArgumentError, ScviOnnxError
from .protocol import InferRequest, ProtocolError, RequestedOutput, encode_response

logger = logging.getLogger(__name__)

PLATFORM = "scvi-onnx"
COUNTS = "counts"
GENE_NAMES = "gene_names"
#: TOTALVI's protein counts (cells x proteins, the model's order unless PROTEIN_NAMES names the
#: columns), as the library reads them from the registered obsm entry or protein modality.
PROTEINS = "proteins"
PROTEIN_NAMES = "protein_names"
#: Counts (and TOTALVI's protein counts) in any of these. Integer counts sent as UINT8 or UINT16
#: (what :func:`scvi_onnx.connect` sends when they fit) are a quarter or half of FP32's bytes and
#: give the same numbers: the library reads every one of them as float32, exactly. BOOL: a
#: binary matrix (PEAKVI's accessibility) as 0 / 1, as the library reads a bool AnnData.
COUNT_DATATYPES = (
    "FP32",
    "FP64",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "INT16",
    "INT8",
    "BOOL",
)
OBS_DATATYPES = ("BYTES", "FP32", "FP64", "INT32", "INT64")

#: Held while a thread swaps the process's warning filters (``warnings.catch_warnings`` is
#: not thread-safe): one lock for every served model, as the filters are the process's.
_WARNING_FILTERS = threading.Lock()


def _int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgumentError(f"parameter {name} must be an integer, got {v!r}")
    return v


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidArgumentError(f"parameter {name} must be a number, got {v!r}")
    return v


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise InvalidArgumentError(f"parameter {name} must be a string, got {v!r}")
    return v


def _mapping(name: str, v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise InvalidArgumentError(
            f"parameter {name} must be an object of obs column -> training category, got {v!r}"
        )
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidArgumentError(f"parameter {name} must be a boolean, got {v!r}")
    return v


#: Request parameter -> (the library's keyword argument, the JSON type it must have). The
#: library checks the values (ranges, choices) and its typed error becomes the 400's message. A
#: parameter goes to each method whose signature takes the keyword, so a new option of the
#: library's methods is served by adding its line here.
PARAMETERS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "seed": ("seed", _int),
    "first_key": ("first_key", _int),
    "n_mc_samples": ("n_mc_samples", _int),
    "mc_samples": ("mc_samples", _int),
    "missing_genes": ("missing_genes", _str),
    "min_gene_overlap": ("min_gene_overlap", _number),
    "use_posterior_mean": ("use_posterior_mean", _bool),
    "unseen_as": ("unseen_as", _mapping),
}
#: Parameters of the protocol itself (or of Triton's client) that are not model options.
PROTOCOL_PARAMETERS = ("binary_data_output", "timeout", "priority")
#: Parameters that bound the work of one request: at most the server's --max-mc-samples.
SAMPLE_PARAMETERS = ("n_mc_samples", "mc_samples")


@dataclass(frozen=True)
class Limits:
    """What one request may ask (the server's options)."""

    max_cells: int = 10_000
    max_mc_samples: int = 10_000
    max_request_bytes: int = 64 << 20
    #: Worker processes of the server (``--workers``), shown in the metadata: a client may
    #: keep that many requests in flight (the library's client does, by default).
    workers: int = 1


@dataclass
class Result:
    """A computed response: its body, the length of its JSON part (binary responses), and
    what the audit log records (never data)."""

    body: bytes
    header_length: int | None
    n_cells: int
    outputs: list[str]


@dataclass
class Prepared:
    """A request checked and turned into the library's arguments (:meth:`ServedModel.prepare`),
    ready to compute."""

    id: str | None
    kw: dict[str, Any]
    outputs: list[RequestedOutput]
    adata: Any


class ServedModel:
    """One bundle served under ``name``: metadata and inference.

    Parameters
    ----------
    name
        The model's name in the URL (``/v2/models/{name}``).
    model
        The loaded library model (shared by every request: the library is thread-safe).
    limits
        Per-request limits.
    """

    def __init__(self, name: str, model: Any, limits: Limits):
        import pandas as pd

        self.name = name
        self.model = model
        self.limits = limits
        self.path = Path(model.path)
        man = model.manifest
        self.digest: str = man.digest
        # the version is derived from the manifest's digest: a different bundle is a
        # different version even under the same name
        self.version: str = man.digest.split(":", 1)[-1][:12]
        self.registry = man.registry
        self.genes: tuple[str, ...] = tuple(str(g) for g in man.genes)
        self.n_latent = int(model.n_latent)
        self.ln = bool(model.module.ln)
        self.rec_keys: tuple[str, ...] = tuple(model.module.reconstruction_keys)
        self.is_scanvi = hasattr(model, "predict")
        self.labels: tuple = tuple(model.labels) if self.is_scanvi else ()
        # one var table for requests in the model's gene order: the library's gene matching
        # reuses the same Index (pandas caches its uniqueness and type)
        self._var = pd.DataFrame(index=man.gene_index)
        self.obs_inputs: dict[str, str] = {key: what for key, what in self.registry.obs_columns()}
        self.proteins = self.registry.proteins  # None: a model without proteins
        self._categorical = {f.key for f in self._category_fields()} - {None}
        self._signatures: dict[str, set[str]] = {
            m: set(inspect.signature(getattr(model, m)).parameters)
            for m in (
                "get_latent_representation",
                "get_elbo",
                "get_reconstruction_error",
                "get_marginal_ll",
                *(("predict",) if self.is_scanvi else ()),
            )
        }
        self.outputs = self._output_specs()

    # ------------------------------------------------------------------ metadata
    def _output_specs(self) -> dict[str, tuple[str, list[int], str]]:
        """Output name -> (datatype, shape, what it is)."""
        L = self.n_latent
        out = {
            "latent": (
                "FP32",
                [-1, L],
                "posterior mean of z: get_latent_representation() (logistic-normal latent: "
                "the Monte-Carlo mean of softmax(z) over mc_samples draws)",
            ),
            "latent_variance": (
                "FP32",
                [-1, L],
                "variance of the Gaussian posterior q(z|x): get_latent_representation("
                "return_dist=True)[1]",
            ),
            "qz_mean": (
                "FP32",
                [-1, L],
                "mean of the Gaussian posterior q(z|x) before any transform: "
                "get_latent_representation(return_dist=True)[0] (= latent for a normal latent)",
            ),
            "latent_sample": (
                "FP32",
                [-1, L],
                "one posterior draw of z: get_latent_representation(give_mean=False)",
            ),
            "elbo": ("FP64", [-1], "per-cell ELBO: get_elbo(return_mean=False)"),
        }
        for key in self.rec_keys:
            out[key] = (
                "FP64",
                [-1],
                f"per-cell get_reconstruction_error(return_mean=False)[{key!r}]",
            )
        out["marginal_ll"] = (
            "FP64",
            [-1],
            "per-cell get_marginal_ll(return_mean=False, n_mc_samples=...)",
        )
        if self.is_scanvi:
            out["label"] = ("BYTES", [-1], "predict(): the most probable label")
            out["label_probabilities"] = (
                "FP32",
                [-1, len(self.labels)],
                "predict(soft=True): one column per label, in parameters.labels order",
            )
        return out

    def input_specs(self) -> list[dict[str, Any]]:
        specs = [
            {"name": COUNTS, "datatype": "FP32", "shape": [-1, len(self.genes)]},
            {"name": GENE_NAMES, "datatype": "BYTES", "shape": [-1]},
        ]
        if self.proteins is not None:
            specs += [
                {"name": PROTEINS, "datatype": "FP32", "shape": [-1, self.proteins.n_proteins]},
                {"name": PROTEIN_NAMES, "datatype": "BYTES", "shape": [-1]},
            ]
        for key, _ in self.registry.obs_columns():
            specs.append(
                {
                    "name": key,
                    "datatype": "BYTES" if key in self._categorical else "FP32",
                    "shape": [-1],
                }
            )
        return specs

    @functools.cached_property
    def metadata_json(self) -> bytes:
        """:meth:`metadata` as JSON, built once (it lists every gene)."""
        return json.dumps(self.metadata(), separators=(",", ":")).encode()

    def metadata(self) -> dict[str, Any]:
        """The model metadata response (``GET /v2/models/{name}``)."""
        reg = self.registry
        params: dict[str, Any] = {
            "model_class": self.model.manifest.model_class,
            "digest": self.digest,
            "n_latent": self.n_latent,
            "latent_distribution": self.model.config.latent_distribution,
            "genes": list(self.genes),
            "registry": reg.to_json(),
            "obs_inputs": {
                key: {
                    "registered_as": what,
                    "datatype": "BYTES" if key in self._categorical else "FP32",
                    "categories": self._categories(key),
                }
                for key, what in reg.obs_columns()
            },
            "count_datatypes": list(COUNT_DATATYPES),
            # the model's likelihood reads counts: non-integer values get the library's warning
            "count_data": bool(self.model.module.needs.count_data),
            "request_parameters": sorted(PARAMETERS),
            "default_outputs": ["latent"],
            "output_descriptions": {k: v[2] for k, v in self.outputs.items()},
            "reconstruction_keys": list(self.rec_keys),
            "max_cells": self.limits.max_cells,
            "max_mc_samples": self.limits.max_mc_samples,
            "max_request_bytes": self.limits.max_request_bytes,
            "workers": self.limits.workers,
        }
        if self.is_scanvi:
            params["labels"] = list(self.labels)
            params["unlabeled_category"] = self.model.unlabeled_category
        if self.proteins is not None:
            params["proteins"] = [str(p) for p in self.proteins.names]
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": self.input_specs(),
            "outputs": [
                {"name": k, "datatype": v[0], "shape": v[1]} for k, v in self.outputs.items()
            ],
            "parameters": params,
        }

    def _category_fields(self) -> list:
        reg = self.registry
        panel = [reg.panel] if reg.panel is not None else []
        return [reg.batch, reg.labels, *reg.categorical_covariates, *panel]

    def _categories(self, key: str) -> list | None:
        for f in self._category_fields():
            if f.key == key:
                return list(f.categories)
        return None

    def warm_up(self) -> None:
        """One tiny request through the library before the server listens, so the first
        client does not pay the lazy imports and tables (scipy, the lgamma table)."""
        import pandas as pd

        obs = {}
        for key, _ in self.registry.obs_columns():
            cats = self._categories(key)
            obs[key] = [str(cats[0])] * 2 if cats else [1.0, 1.0]
        if self.is_scanvi and self.registry.labels.key in obs:
            del obs[self.registry.labels.key]
        proteins = None
        if self.proteins is not None:
            proteins = np.ones((2, self.proteins.n_proteins), np.float32)
        adata = self._adata_from(
            np.ones((2, len(self.genes)), np.float32), self._var, pd.DataFrame(obs), 0, proteins
        )
        want = {"latent", "elbo", "marginal_ll", *(("label",) if self.is_scanvi else ())}
        self.compute(adata, want, {"n_mc_samples": 2})

    # ------------------------------------------------------------------ inference
    def _kwargs(self, params: dict[str, Any]) -> dict[str, Any]:
        """Request parameters -> the library's keyword arguments (types checked here, values
        by the library)."""
        kw = {}
        for name, value in params.items():
            if name in PROTOCOL_PARAMETERS:
                continue
            if name not in PARAMETERS:
                raise InvalidArgumentError(
                    f"unknown parameter {name!r}; this model takes {', '.join(sorted(PARAMETERS))}"
                )
            keyword, check = PARAMETERS[name]
            kw[keyword] = check(name, value)
        for name in SAMPLE_PARAMETERS:
            value = kw.get(PARAMETERS[name][0])
            if value is not None and value > self.limits.max_mc_samples:
                raise InvalidArgumentError(
                    f"{name}={value} is more than this server allows per request "
                    f"({self.limits.max_mc_samples}, --max-mc-samples)"
                )
        return kw

    def _call(self, method: str, adata: Any, kw: dict[str, Any], **fixed: Any) -> Any:
        """A library method with the keyword arguments its signature takes."""
        accepted = self._signatures[method]
        args = {k: v for k, v in kw.items() if k in accepted}
        args.update(fixed)
        return getattr(self.model, method)(adata, **args)

    def _adata(self, req: InferRequest, first_key: int) -> Any:
        """The request's cells as an AnnData, where the library reads them."""
        import pandas as pd

        counts, var, obs, proteins, protein_names = self._checked_inputs(req)
        return self._adata_from(counts, var, pd.DataFrame(obs), first_key, proteins, protein_names)

    def _checked_inputs(self, req: InferRequest) -> tuple:
        """The request's inputs, checked (names, datatypes, shapes, ``--max-cells``): ``(counts,
        var, obs columns, proteins, protein names)``, what :meth:`_adata` builds from. Nothing
        is built or copied here, so the batcher asks it on the event loop too."""
        inputs = dict(req.inputs)
        if COUNTS not in inputs:
            raise InvalidArgumentError(
                f"missing input {COUNTS!r}: the counts, {list(COUNT_DATATYPES)} of shape "
                f"[n_cells, n_genes]"
            )
        counts = inputs.pop(COUNTS)
        dt = req.datatypes[COUNTS]
        if dt not in COUNT_DATATYPES:
            raise InvalidArgumentError(
                f"input {COUNTS!r} has datatype {dt}; send the counts as "
                f"{', '.join(COUNT_DATATYPES)}"
            )
        if counts.ndim != 2:
            raise InvalidArgumentError(
                f"input {COUNTS!r} has shape {list(counts.shape)}; expected [n_cells, n_genes]"
            )
        n, n_cols = counts.shape
        if n == 0:
            raise InvalidArgumentError(f"input {COUNTS!r} holds no cell (shape [0, {n_cols}])")
        if n > self.limits.max_cells:
            raise InvalidArgumentError(
                f"the request holds {n} cells, more than this server takes per request "
                f"({self.limits.max_cells}, --max-cells); split it into smaller requests"
            )
        names = inputs.pop(GENE_NAMES, None)
        if names is None:
            if n_cols != len(self.genes):
                raise InvalidArgumentError(
                    f"input {COUNTS!r} has {n_cols} columns but the model has "
                    f"{len(self.genes)} genes; send them in the model's order (parameters.genes "
                    f"of GET /v2/models/{self.name}) or name the columns with a "
                    f"{GENE_NAMES!r} input"
                )
            var = self._var
        else:
            import pandas as pd

            if names.ndim == 2 and names.shape[0] == 1:  # [1, n_genes]: one row of names
                names = names.reshape(-1)
            if req.datatypes[GENE_NAMES] != "BYTES" or names.ndim != 1 or names.size != n_cols:
                raise InvalidArgumentError(
                    f"input {GENE_NAMES!r} must be BYTES of shape [{n_cols}] (one name per "
                    f"column of {COUNTS!r}), got {req.datatypes[GENE_NAMES]} "
                    f"{list(names.shape)}"
                )
            var = pd.DataFrame(index=pd.Index(names.astype(str), dtype=object))
        proteins, protein_names = self._protein_inputs(req, inputs, n)
        obs = {}
        for key, arr in inputs.items():
            if key not in self.obs_inputs:
                proteins = [PROTEINS, PROTEIN_NAMES] if self.proteins is not None else []
                expected = [COUNTS, GENE_NAMES, *proteins, *self.obs_inputs]
                raise InvalidArgumentError(
                    f"unknown input {key!r}; this model takes {', '.join(map(repr, expected))}"
                )
            dt = req.datatypes[key]
            if dt not in OBS_DATATYPES:
                raise InvalidArgumentError(
                    f"input {key!r} has datatype {dt}; send obs column {key!r} as BYTES "
                    "(category names) or FP32 (numbers)"
                )
            if arr.shape not in ((n,), (n, 1)):
                raise InvalidArgumentError(
                    f"input {key!r} has shape {list(arr.shape)}; expected [{n}] (one value per "
                    "cell)"
                )
            obs[key] = arr.reshape(n)
        return counts, var, obs, proteins, protein_names

    def _protein_inputs(
        self, req: InferRequest, inputs: dict[str, np.ndarray], n: int
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The request's protein counts and names (popped from ``inputs``), checked for their
        datatype and shape; ``(None, None)`` for a model without proteins."""
        if self.proteins is None:
            return None, None
        P = self.proteins.n_proteins
        if PROTEINS not in inputs:
            raise InvalidArgumentError(
                f"missing input {PROTEINS!r}: this {self.model.manifest.model_class} model reads "
                f"protein counts, {list(COUNT_DATATYPES)} of shape [n_cells, {P}] in the order "
                f"of parameters.proteins of GET /v2/models/{self.name} (or name the columns "
                f"with a {PROTEIN_NAMES!r} input)"
            )
        proteins = inputs.pop(PROTEINS)
        if req.datatypes[PROTEINS] not in COUNT_DATATYPES:
            raise InvalidArgumentError(
                f"input {PROTEINS!r} has datatype {req.datatypes[PROTEINS]}; send the protein "
                f"counts as {', '.join(COUNT_DATATYPES)}"
            )
        if proteins.ndim != 2 or proteins.shape[0] != n:
            raise InvalidArgumentError(
                f"input {PROTEINS!r} has shape {list(proteins.shape)}; expected [{n}, n_proteins] "
                f"(one row per cell of {COUNTS!r})"
            )
        names = inputs.pop(PROTEIN_NAMES, None)
        if names is None:
            if proteins.shape[1] != P:
                raise InvalidArgumentError(
                    f"input {PROTEINS!r} has {proteins.shape[1]} columns but the model has {P} "
                    f"proteins; send them in the model's order (parameters.proteins of "
                    f"GET /v2/models/{self.name}) or name the columns with a "
                    f"{PROTEIN_NAMES!r} input"
                )
            return proteins, None
        if names.ndim == 2 and names.shape[0] == 1:
            names = names.reshape(-1)
        if (
            req.datatypes[PROTEIN_NAMES] != "BYTES"
            or names.ndim != 1
            or names.size != proteins.shape[1]
        ):
            raise InvalidArgumentError(
                f"input {PROTEIN_NAMES!r} must be BYTES of shape [{proteins.shape[1]}] (one name "
                f"per column of {PROTEINS!r}), got {req.datatypes[PROTEIN_NAMES]} "
                f"{list(names.shape)}"
            )
        return proteins, names.astype(str)

    def _adata_from(
        self,
        counts: np.ndarray,
        var: Any,
        obs: Any,
        first_key: int,
        proteins: np.ndarray | None = None,
        protein_names: np.ndarray | None = None,
    ) -> Any:
        """What the library reads: an AnnData with the counts in X (or in the registered
        layer) and, for TOTALVI, the proteins in the registered obsm entry; a MuData of the
        registered modalities for a model set up with ``setup_mudata``."""
        import anndata as ad
        import pandas as pd

        n = counts.shape[0]
        # cells are named by their key, so a message about cell k names row k of the client's
        # AnnData when the client sent first_key (the request never holds cell names)
        obs.index = pd.Index([f"cell {first_key + i}" for i in range(n)], dtype=object)
        layer = self.registry.layer
        if layer is None:
            adata = ad.AnnData(X=counts, obs=obs, var=var)
        else:
            adata = ad.AnnData(obs=obs, var=var, layers={layer: counts})
        field = self.proteins
        if field is None:
            return adata
        names = pd.Index(
            [str(p) for p in field.names] if protein_names is None else protein_names,
            dtype=object,
        )
        mods = self.registry.modalities
        if mods is None:  # setup_anndata: the registered obsm entry, its columns named
            adata.obsm[field.attr_key] = pd.DataFrame(proteins, index=obs.index, columns=names)
            return adata
        return self._mudata(adata, proteins, names, obs)

    def _mudata(self, rna: Any, proteins: np.ndarray, names: Any, obs: Any) -> Any:
        """The MuData a ``setup_mudata`` model reads: the RNA and protein modalities under
        their registered names, every obs column in each modality and in the MuData's own
        obs (wherever the model registered it)."""
        import anndata as ad
        import mudata
        import pandas as pd

        mods, field = self.registry.modalities, self.proteins
        prot = ad.AnnData(obs=obs.copy(), var=pd.DataFrame(index=names))
        if field.attr_name == "layers" and field.attr_key is not None:
            prot.layers[field.attr_key] = proteins
        else:
            prot.X = proteins
        # mudata's FutureWarning about pulling obs columns (every column is set below), hidden
        # under a lock: catch_warnings swaps the process's filters, and two threads doing so at
        # once (two decoding threads, two workers) could leave "ignore" installed for good
        with _WARNING_FILTERS, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="From 0.4", category=FutureWarning)
            md = mudata.MuData({mods["X"]: rna, mods["proteins"]: prot})
            for key in obs.columns:
                md.obs[key] = obs[key].to_numpy()
        return md

    def _outputs(self, requested: list[RequestedOutput] | None, binary: bool):
        if requested is None:
            return [RequestedOutput("latent", binary)]
        if not requested:
            raise InvalidArgumentError("the request asks for no output")
        for o in requested:
            if o.name not in self.outputs:
                raise InvalidArgumentError(
                    f"unknown output {o.name!r}; this model gives "
                    f"{', '.join(map(repr, self.outputs))}"
                )
        return requested

    def infer(self, req: InferRequest) -> Result:
        """Run a decoded request with the library (on a worker thread)."""
        return self.run(self.prepare(req))

    def prepare(self, req: InferRequest) -> Prepared:
        """Everything of a decoded request up to the library's methods: its parameters (names
        and types), its outputs, its inputs as an AnnData (datatypes, shapes, the server's
        limits). The server runs this before the request waits for a worker, so a request
        refused here is answered at once, with the message :meth:`infer` gives (it is the
        same code, in the same order); what only the library checks (values such as a
        seed's range, the cells' data) is answered when it runs."""
        kw = self._kwargs(req.parameters)
        first_key = kw.get("first_key", 0)  # names the cells in messages; the library checks it
        outputs = self._outputs(req.outputs, req.binary_output)
        adata = self._adata(req, first_key)
        return Prepared(req.id, kw, outputs, adata)

    def run(self, prepared: Prepared) -> Result:
        """Compute a :meth:`prepare`-d request with the library (on a worker thread)."""
        outputs, adata = prepared.outputs, prepared.adata
        values = self.compute(adata, {o.name for o in outputs}, prepared.kw)
        tensors = [(o.name, self.outputs[o.name][0], values[o.name], o.binary) for o in outputs]
        body, hlen = encode_response(self.name, self.version, prepared.id, tensors)
        return Result(body, hlen, adata.n_obs, [o.name for o in outputs])

    # ------------------------------------------------------------------ dynamic batching
    def batch_key(self, req: InferRequest) -> tuple | None:
        """What concurrent requests must share to be computed in one library call, or None
        when ``req`` cannot be batched.

        Only outputs that are pure functions of each cell's data are batched: the posterior
        mean and variance of a normal latent, SCANVI's labels at the posterior mean. The
        library gives a cell the same bits whatever the other cells of its call (one ONNX
        Runtime thread per session; tested), and these outputs draw no noise, so a batched
        request gets exactly what it would alone. Anything else (noise, gene names, an
        unknown parameter, a malformed input) takes the single-request path.
        """
        allowed = {"latent_variance", "qz_mean"}
        if not self.ln:
            allowed.add("latent")
        if self.is_scanvi:
            allowed |= {"label", "label_probabilities"}
        names = ["latent"] if req.outputs is None else [o.name for o in req.outputs]
        if not names or not set(names) <= allowed:
            return None
        params = {k: v for k, v in req.parameters.items() if k not in PROTOCOL_PARAMETERS}
        if not set(params) <= {"seed", "first_key"} or GENE_NAMES in req.inputs:
            return None  # (seed and first_key only key noise, which these outputs never draw)
        try:  # the library's checks, as the request alone gets them (else it is refused
            # alone or batched depending on what else is in flight)
            if "seed" in params:
                check_seed(params["seed"])
            if "first_key" in params:
                check_first_key(params["first_key"])
        except InvalidArgumentError:
            return None
        if self.proteins is not None:
            return None  # (TOTALVI: its proteins are no obs input; never batched)
        try:  # what the single-request path would refuse goes there, to be refused alone
            self._checked_inputs(req)
        except Exception:
            return None
        return tuple(sorted(req.datatypes.items()))

    def infer_batch(self, reqs: list[InferRequest]) -> list[Result | Exception]:
        """Requests of one :meth:`batch_key`, in one library call; each gets its own response
        (its outputs, encodings and id). Should the joint call fail (one request's bad data),
        each request is run alone, so every error names its own request's cells."""
        if len(reqs) == 1:
            return [self._alone(reqs[0])]
        try:
            sizes = [r.inputs[COUNTS].shape[0] for r in reqs]
            joint = InferRequest(
                None,
                {
                    k: np.concatenate(
                        [r.inputs[k].reshape(n, -1) for r, n in zip(reqs, sizes, strict=True)]
                    )
                    for k in reqs[0].inputs
                },
                dict(reqs[0].datatypes),
                {},
                None,
            )
            for k in joint.inputs:
                if k != COUNTS:
                    joint.inputs[k] = joint.inputs[k].reshape(-1)
            outputs = [self._outputs(r.outputs, r.binary_output) for r in reqs]
            want = {o.name for outs in outputs for o in outs}
            values = self.compute(self._adata(joint, 0), want, {})
        except (ScviOnnxError, ProtocolError):
            return [self._alone(r) for r in reqs]
        results: list[Result | Exception] = []
        start = 0
        for r, n, outs in zip(reqs, sizes, outputs, strict=True):
            tensors = [
                (o.name, self.outputs[o.name][0], values[o.name][start : start + n], o.binary)
                for o in outs
            ]
            body, hlen = encode_response(self.name, self.version, r.id, tensors)
            results.append(Result(body, hlen, n, [o.name for o in outs]))
            start += n
        return results

    def _alone(self, req: InferRequest) -> Result | Exception:
        try:
            return self.infer(req)
        except Exception as e:  # handed to the request's own handler, which maps it
            return e

    def compute(self, adata: Any, want: set[str], kw: dict[str, Any]) -> dict[str, np.ndarray]:
        """The outputs ``want`` of the cells of ``adata``, each from the library's method."""
        out: dict[str, np.ndarray] = {}
        dist = {"latent_variance", "qz_mean"} & want
        if dist or ("latent" in want and not self.ln):
            if dist:
                qm, qv = self._call("get_latent_representation", adata, kw, return_dist=True)
                out["latent_variance"], out["qz_mean"] = qv, qm
                if not self.ln:
                    # a normal latent's posterior mean is qz_m: the same array the default
                    # call returns (the encoder's output), computed once
                    out["latent"] = qm
            else:
                out["latent"] = self._call("get_latent_representation", adata, kw)
        if "latent" in want and "latent" not in out:
            out["latent"] = self._call("get_latent_representation", adata, kw)
        if "latent_sample" in want:
            out["latent_sample"] = self._call(
                "get_latent_representation", adata, kw, give_mean=False
            )
        if "elbo" in want:
            out["elbo"] = self._call("get_elbo", adata, kw, return_mean=False)
        if set(self.rec_keys) & want:
            rec = self._call("get_reconstruction_error", adata, kw, return_mean=False)
            out.update(rec)
        if "marginal_ll" in want:
            out["marginal_ll"] = self._call("get_marginal_ll", adata, kw, return_mean=False)
        if "label_probabilities" in want:
            probs = self._call("predict", adata, kw, soft=True).to_numpy(dtype=np.float32)
            out["label_probabilities"] = probs
            if "label" in want:  # what predict(soft=False) does with the same probabilities
                out["label"] = np.array(
                    [str(self.labels[c]) for c in probs.argmax(axis=1)], dtype=object
                )
        elif "label" in want:
            labels = self._call("predict", adata, kw, soft=False)
            out["label"] = np.array([str(v) for v in labels], dtype=object)
        return out


def bundle_name(path: str | Path) -> str:
    """A bundle's default served name: its folder's name."""
    return Path(path).resolve().name


def check_name(name: str) -> str:
    """Served names go into URLs: letters, digits and ``._-`` only."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name or ""):
        raise InvalidArgumentError(
            f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-' (it is part of "
            "the URL); choose one with --name NAME=PATH"
        )
    return name


__all__ = [
    "Limits",
    "ProtocolError",
    "Result",
    "ServedModel",
    "bundle_name",
    "check_name",
]
