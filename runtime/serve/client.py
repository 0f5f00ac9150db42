"""The library's four methods (and SCANVI's ``predict``), computed by a ``scvi-onnx serve``.

A script moves from a local bundle to a remote service by changing one line::

    model = scvi_onnx.load("models/pbmc_scvi")                              # local
    model = scvi_onnx.connect("http://127.0.0.1:8000/v2/models/pbmc_scvi")  # remote

The remote model has the local model's methods, signatures and return types. It reads the
AnnData here as the library does (the model's genes matched by name with the library's
:class:`~scvi_onnx.data.GeneMatch`, rows read by its matrix reader: dense, CSR/CSC or backed,
never densified whole; the registered obs columns), and sends the cells in bounded requests of
binary tensor data. Each request carries ``first_key``, the row of its first cell in the
AnnData, so every cell's noise is keyed as the local library keys it: the numbers equal the
local model's for the same seed, whatever the request size. Requests answered 503 or 429 are
retried after the server's ``Retry-After``; a refused request raises the library's typed error
(``MissingGenesError``, ``UnknownCategoryError``, ...) with the server's message.

Only the standard library (``http.client``) and the runtime's own dependencies are used.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import numpy as np

from .. import errors as E
from ..arguments import check_first_key, check_positive_int, check_seed
from ..errors import InvalidArgumentError, ScviOnnxError
from ..threads import ordered_map
from .protocol import DATATYPES, HEADER_LENGTH, encode_bytes

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

#: Cells per request when the server states no smaller bound.
DEFAULT_CHUNK_CELLS = 1024
#: Longest wait between retries (seconds), whatever Retry-After says.
MAX_RETRY_WAIT_S = 30.0


class ServerError(ScviOnnxError, RuntimeError):
    """The server refused or failed a request (HTTP ``status``) for a reason that is not one
    of the library's typed input errors."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _typed_error(status: int, message: str, error_type: str | None) -> Exception:
    """The library's error class named by the server (only classes of ``scvi_onnx.errors``)."""
    if error_type in E.__all__:
        cls = getattr(E, error_type)
        if isinstance(cls, type) and issubclass(cls, ScviOnnxError):
            return cls(message)
    return ServerError(f"HTTP {status}: {message}", status)


class _Transport:
    """Keep-alive HTTP(S) connections (one per thread), bearer token, retries."""

    def __init__(
        self,
        base: str,
        *,
        token: str | None,
        cafile: str | None,
        timeout: float,
        retries: int,
    ):
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgumentError(
                f"expected an http:// or https:// URL of a scvi-onnx server, got {base!r}"
            )
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self._ssl = None
        if self.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=cafile)
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []  # every thread's, for close()
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
        self._local.conn = None

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        delay = 0.5
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                conn = self._connection()
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                # the request is a pure function of its body: sending it again is safe
                self._drop()
                if last:
                    raise ServerError(
                        f"cannot reach {self.scheme}://{self.host}:{self.port} ({e})", 0
                    ) from e
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_WAIT_S)
                continue
            if resp.getheader("Connection", "").lower() == "close":
                self._drop()
            if resp.status in (429, 503) and not last:
                wait = resp.getheader("Retry-After")
                try:
                    pause = float(wait) if wait is not None else delay
                except ValueError:
                    pause = delay
                time.sleep(min(max(pause, 0.05), MAX_RETRY_WAIT_S))
                delay = min(delay * 2, MAX_RETRY_WAIT_S)
                continue
            return resp.status, resp.headers, data
        raise AssertionError("unreachable")  # pragma: no cover

    def json(self, method: str, path: str) -> Any:
        status, _, data = self.request(method, path)
        if status != 200:
            raise _error_of(status, data)
        return json.loads(data)

    def close(self) -> None:
        """Close every thread's connection (a later request opens a new one)."""
        self._drop()
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _error_of(status: int, data: bytes) -> Exception:
    try:
        doc = json.loads(data)
        message, kind = doc.get("error", ""), doc.get("error_type")
    except (ValueError, AttributeError):
        message, kind = data[:200].decode("utf-8", "replace"), None
    return _typed_error(status, message or f"HTTP {status}", kind)


def _decode_outputs(headers: http.client.HTTPMessage, body: bytes) -> dict[str, np.ndarray]:
    hlen = headers.get(HEADER_LENGTH)
    head, tail = (body, b"") if hlen is None else (body[: int(hlen)], body[int(hlen) :])
    doc = json.loads(head)
    out = {}
    offset = 0
    for o in doc.get("outputs", []):
        dt, shape = o["datatype"], o["shape"]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = tail[offset : offset + size]
            offset += size
            if dt == "BYTES":
                from .protocol import _binary_tensor

                arr = _binary_tensor(o["name"], dt, tuple(shape), memoryview(raw))
            else:
                arr = np.frombuffer(raw, dtype=DATATYPES[dt]).reshape(shape)
        else:
            data = o["data"]
            arr = np.array(data, dtype=object if dt == "BYTES" else DATATYPES[dt]).reshape(shape)
        out[o["name"]] = arr
    return out


#: The narrow integer datatypes a request's counts may travel in, narrowest first, with the
#: largest count each holds.
NARROW_COUNTS = (("UINT8", 255), ("UINT16", 65535))


def _counts_tensor(
    x: np.ndarray, accepted: Iterable[str] = ("UINT8", "UINT16")
) -> tuple[str, np.ndarray]:
    """(datatype, array) of a dense block of counts for the wire: the narrowest of UINT8 /
    UINT16 in ``accepted`` (the server's ``count_datatypes``) that holds every value exactly
    (a quarter or half of FP32's bytes; the server reads them as the same float32 numbers),
    else FP32 as read (non-integer, negative or NaN values reach the server unchanged, which
    refuses or warns about them as the library does)."""
    x = np.asarray(x)
    narrow = [(dt, top) for dt, top in NARROW_COUNTS if dt in accepted]
    if x.size == 0 or not narrow:
        return "FP32", x
    hi, lo = x.max(), x.min()
    if lo >= 0:  # NaN fails this
        for datatype, top in narrow:
            if hi <= top:
                cast = x.astype(DATATYPES[datatype])
                if np.array_equal(cast, x):  # integers only
                    return datatype, cast
                break
    return "FP32", x


def _binary_request(
    inputs: list[tuple[str, str, np.ndarray]],
    outputs: list[str],
    parameters: dict[str, Any],
) -> tuple[bytes, int]:
    """A binary-tensor-data request: the JSON header, then every input's bytes."""
    blobs, tensors = [], []
    for name, datatype, arr in inputs:
        if datatype == "BYTES":
            blob = encode_bytes(arr)
        else:
            blob = np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
        tensors.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": list(arr.shape),
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    doc = {
        "inputs": tensors,
        "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
        "parameters": parameters,
    }
    head = json.dumps(doc, separators=(",", ":")).encode()
    return b"".join([head, *blobs]), len(head)


def _runs(sorted_rows: np.ndarray, max_len: int) -> Iterator[tuple[int, int]]:
    """(start, stop) positions in ``sorted_rows`` of runs of consecutive rows, at most
    ``max_len`` long: each run is one request whose first row keys its cells' noise."""
    n = sorted_rows.size
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [n]])
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        for s in range(a, b, max_len):
            yield s, min(s + max_len, b)


class RemoteModel:
    """A model served by ``scvi-onnx serve``, with the library's four methods.

    Use :func:`scvi_onnx.connect` to create one. The methods take the local model's
    arguments (``adata``, ``indices``, ``batch_size``, ``return_mean``, ``seed``,
    ``missing_genes``, ``min_gene_overlap``, ``progress_bar``, ...) and return what it returns;
    ``dataloader=`` is not supported remotely (pass an AnnData).

    Attributes
    ----------
    url
        The model's URL (``.../v2/models/{name}``).
    name, version, digest
        The served model's name, version and bundle digest.
    genes
        The model's genes, in its order.
    n_latent
        Dimension of the latent space.
    seed
        Default seed of the stochastic methods.
    """

    def __init__(
        self,
        transport: _Transport,
        name: str,
        metadata: dict,
        *,
        adata,
        seed,
        chunk_cells,
        concurrency=None,
    ):
        from ..bundle import Registry

        self._t = transport
        self.name = name
        self._meta = metadata
        params = metadata.get("parameters", {})
        self.version = metadata["versions"][0]
        self.digest = params.get("digest")
        self.model_class = params.get("model_class")
        self.genes = tuple(params["genes"])
        self.n_latent = int(params["n_latent"])
        self.registry = Registry.from_json(params["registry"])
        self.rec_keys = tuple(params.get("reconstruction_keys", ("reconstruction_loss",)))
        self.obs_inputs = dict(params.get("obs_inputs", {}))
        # the narrow integer datatypes the server takes for counts (a server from before they
        # were accepted lists none of them: the client then sends FP32, as it did)
        self._count_datatypes = frozenset(params.get("count_datatypes", ("FP32",)))
        # whether the library warns about non-integer values (a server that does not say:
        # no warning, as before)
        self._count_data = bool(params.get("count_data", False))
        self.adata = adata
        self.seed = check_seed(seed)
        max_cells = int(params.get("max_cells", DEFAULT_CHUNK_CELLS))
        # a request's body stays well under the server's limit (4 bytes a count)
        by_bytes = int(params.get("max_request_bytes", 64 << 20)) // (8 * max(len(self.genes), 1))
        bound = max(1, min(max_cells, by_bytes))
        self.chunk_cells = min(check_positive_int("chunk_cells", chunk_cells or bound), bound)
        workers = params.get("workers", 1)
        self.concurrency = check_positive_int(
            "concurrency", concurrency if concurrency is not None else workers
        )
        base = f"{transport.scheme}://{transport.host}:{transport.port}"
        self.url = f"{base}/v2/models/{quote(name)}"
        self._path = f"/v2/models/{quote(name)}/versions/{quote(self.version)}/infer"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(url={self.url!r}, model_class={self.model_class!r}, "
            f"genes={len(self.genes)}, n_latent={self.n_latent}, digest={self.digest!r})"
        )

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ data
    def gene_overlap(self, adata: Any) -> dict[str, Any]:
        """As the local model's: how many of the model's genes ``adata`` has."""
        from ..api.base import OnnxVAEModel

        return OnnxVAEModel.gene_overlap(self, adata)

    def _expression(self, adata: Any, layer: str | None = None) -> Any:
        """The counts as the library reads them: ``layer``, else the registered layer or X."""
        if layer is not None and not isinstance(layer, str):
            raise InvalidArgumentError(f"layer must be a layer name (str), got {layer!r}")
        layer = self.registry.layer if layer is None else layer
        if layer is None:
            if adata.X is None:
                raise E.InputDataError(
                    "adata.X is None but the model reads its counts from adata.X; put the raw "
                    "counts in adata.X"
                )
            return adata.X
        if layer not in adata.layers:
            raise E.MissingColumnError(
                f"adata.layers has no layer {layer!r} to read the counts from; layers present: "
                f"{', '.join(map(repr, adata.layers.keys())) or 'none'}"
            )
        return adata.layers[layer]

    def _obs_tensors(self, obs: Any, lo: int, hi: int) -> list[tuple[str, str, np.ndarray]]:
        import pandas as pd

        out = []
        for key in self.obs_inputs:
            if key not in obs.columns:
                continue
            col = obs[key].iloc[lo:hi]
            if pd.api.types.is_numeric_dtype(col.dtype) and not isinstance(
                col.dtype, pd.CategoricalDtype
            ):
                values = col.to_numpy(dtype=np.float64, na_value=np.nan)
                out.append((key, "FP64", values))
            else:
                values = np.array([str(v) for v in col.to_numpy()], dtype=object)
                out.append((key, "BYTES", values))
        return out

    def _run(
        self,
        adata: Any,
        indices: Any,
        outputs: list[str],
        params: dict[str, Any],
        *,
        missing_genes: str,
        min_gene_overlap: float,
        layer: str | None,
        gene_key: str | None,
        unseen_as: Mapping[str, Any] | None,
        progress_bar: bool,
        first_key: int,
        dataloader: Any = None,
    ) -> tuple[dict[str, np.ndarray], Any, np.ndarray]:
        """The per-cell ``outputs`` of the selected cells, in the selection's order."""
        import anndata

        from ..arguments import check_choice, check_fraction
        from ..data import GeneMatch, resolve_indices
        from ..data.checks import ValueChecker, dtype_is_integer, where_phrase
        from ..data.genes import MISSING_GENES_MODES, gene_names
        from ..data.mudata import split_input
        from ..data.proteins import ProteinReader, obsm_proteins
        from ..data.readers import MatrixReader
        from ..models.registry import feature_name

        if dataloader is not None:
            raise InvalidArgumentError(
                "dataloader= is not supported by a remote model: pass an AnnData (in memory "
                "or backed)"
            )
        data = self.adata if adata is None else adata
        if data is None:
            raise InvalidArgumentError(
                "no data: pass adata= (or bind an AnnData at scvi_onnx.connect(url, adata=...))"
            )
        # a setup_mudata model: its modalities, as the library reads them
        data, protein_input = split_input(data, self.registry)
        if not isinstance(data, anndata.AnnData):
            raise E.InputDataError(
                f"expected an anndata.AnnData, got {type(data).__name__}; load your data with "
                "anndata.read_h5ad(path) (or backed='r' for large files)"
            )
        check_choice("missing_genes", missing_genes, MISSING_GENES_MODES)
        min_gene_overlap = check_fraction("min_gene_overlap", min_gene_overlap)
        first_key = check_first_key(first_key)
        if data.n_obs == 0:
            raise E.InputDataError(
                "empty AnnData: it holds 0 cells; nothing to score: pass an AnnData with at "
                "least one cell"
            )
        idx = resolve_indices(indices, data.n_obs)
        names, where = gene_names(data, gene_key)
        genes = GeneMatch(
            names,
            self.genes,
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            what=feature_name(self.model_class),
            where=where,
            var=data.var,
        )
        if unseen_as:
            if not isinstance(unseen_as, Mapping):
                raise InvalidArgumentError(
                    f"unseen_as must be a mapping of obs column -> training category, got "
                    f"{unseen_as!r}"
                )
            params = {**params, "unseen_as": {str(k): str(v) for k, v in unseen_as.items()}}
        matrix = self._expression(data, layer)
        reader = MatrixReader(matrix, genes)
        # the library's value checks, here, where the cells have their names (the server
        # checks again, naming cells by their row in a request), and its one warning about
        # non-integer values, which a server can only log
        layer_used = self.registry.layer if layer is None else layer
        checker = ValueChecker(
            require_positive_library=False,
            count_data=self._count_data,
            source="adata.X" if layer_used is None else f"adata.layers[{layer_used!r}]",
        )
        integer_x = dtype_is_integer(getattr(matrix, "dtype", None))
        proteins = None
        field = self.registry.proteins
        if field is not None:  # TOTALVI: the protein counts, in the model's order
            proteins = ProteinReader(
                protein_input if protein_input is not None else obsm_proteins(data, field),
                field,
                data.n_obs,
                missing_genes=missing_genes,
                min_gene_overlap=min_gene_overlap,
            )
        prot_checker = None
        if proteins is not None:
            prot_checker = ValueChecker(
                require_positive_library=False, count_data=self._count_data, source=proteins.where
            )
        order = np.argsort(idx, kind="stable")
        rows_sorted = idx[order]
        results: dict[str, np.ndarray] = {}
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=idx.size, unit="cell", leave=False)

        def requests() -> Iterator[tuple[int, int, tuple]]:
            # read here, on the calling thread (a backed file is not for concurrent reads)
            for a, b in _runs(rows_sorted, self.chunk_cells):
                lo, hi = int(rows_sorted[a]), int(rows_sorted[b - 1]) + 1
                x, _ = reader.read(np.arange(lo, hi))()

                def names(rows, lo=lo):
                    return [str(n) for n in data.obs_names[lo + np.asarray(rows)]]

                # as the library words it: positions in the selection, in the order read
                where = where_phrase(a, b - a, idx.size)
                checker.record(checker.check(x, names, integer_x, where=where))
                counts = _counts_tensor(x, self._count_datatypes)
                inputs = [("counts", *counts), *self._obs_tensors(data.obs, lo, hi)]
                if proteins is not None:
                    p = proteins.read(np.arange(lo, hi))()
                    prot_checker.record(
                        prot_checker.check(p, names, proteins.integer_input, where=where)
                    )
                    inputs.append(("proteins", *_counts_tensor(p, self._count_datatypes)))
                yield a, b, (inputs, outputs, {**params, "first_key": first_key + lo})

        def send(item: tuple[int, int, tuple]) -> tuple[int, int, dict[str, np.ndarray]]:
            a, b, request = item
            return a, b, self._infer(*request)

        # up to `concurrency` requests in flight, each on its own thread's connection,
        # answers taken in order
        threads = self.concurrency if self.concurrency > 1 else 0
        try:
            for a, b, got in ordered_map(send, requests(), threads, "scvi-onnx-client"):
                for name, arr in got.items():
                    if name not in results:
                        results[name] = np.empty((idx.size, *arr.shape[1:]), dtype=arr.dtype)
                    results[name][order[a:b]] = arr
                if bar is not None:
                    bar.update(b - a)
        finally:
            if bar is not None:
                bar.close()
        checker.finish()
        if prot_checker is not None:
            prot_checker.finish()
        return results, data, idx

    def _infer(
        self, inputs: list[tuple[str, str, np.ndarray]], outputs: list[str], params: dict
    ) -> dict[str, np.ndarray]:
        body, hlen = _binary_request(inputs, outputs, params)
        status, headers, data = self._t.request(
            "POST",
            self._path,
            body,
            {HEADER_LENGTH: str(hlen), "Content-Type": "application/octet-stream"},
        )
        if status != 200:
            raise _error_of(status, data)
        return _decode_outputs(headers, data)

    def _seed(self, seed: int | None) -> int:
        return self.seed if seed is None else check_seed(seed)

    # ------------------------------------------------------------------ the four methods
    def get_latent_representation(
        self,
        adata: Any = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5_000,
        batch_size: int | None = None,
        return_dist: bool = False,
        dataloader: Iterable[dict[str, Any]] | None = None,
        *,
        seed: int | None = None,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        layer: str | None = None,
        gene_key: str | None = None,
        unseen_as: Mapping[str, Any] | None = None,
        progress_bar: bool = False,
        first_key: int = 0,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """As :meth:`scvi_onnx.OnnxSCVI.get_latent_representation`, computed by the server."""
        check_positive_int("batch_size", batch_size, allow_none=True)
        params: dict[str, Any] = {"seed": self._seed(seed)}
        if return_dist:
            outputs = ["qz_mean", "latent_variance"]
        elif give_mean:
            outputs = ["latent"]
            if self._meta.get("parameters", {}).get("latent_distribution") == "ln":
                params["mc_samples"] = check_positive_int("mc_samples", mc_samples)
        else:
            outputs = ["latent_sample"]
        res, _, _ = self._run(
            adata,
            indices,
            outputs,
            params,
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            layer=layer,
            gene_key=gene_key,
            unseen_as=unseen_as,
            progress_bar=progress_bar,
            first_key=first_key,
            dataloader=dataloader,
        )
        if return_dist:
            return res["qz_mean"], res["latent_variance"]
        return res[outputs[0]]

    def get_elbo(
        self,
        adata: Any = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        dataloader: Iterable[dict[str, Any]] | None = None,
        return_mean: bool = True,
        data_loader_kwargs: dict | None = None,
        *,
        seed: int | None = None,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        layer: str | None = None,
        gene_key: str | None = None,
        unseen_as: Mapping[str, Any] | None = None,
        progress_bar: bool = False,
        first_key: int = 0,
    ) -> float | np.ndarray:
        """As :meth:`scvi_onnx.OnnxSCVI.get_elbo`, computed by the server."""
        from ..api.base import _no_loader_kwargs

        _no_loader_kwargs(data_loader_kwargs)
        check_positive_int("batch_size", batch_size, allow_none=True)
        res, _, _ = self._run(
            adata,
            indices,
            ["elbo"],
            {"seed": self._seed(seed)},
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            layer=layer,
            gene_key=gene_key,
            unseen_as=unseen_as,
            progress_bar=progress_bar,
            first_key=first_key,
            dataloader=dataloader,
        )
        out = res["elbo"]
        return float(out.mean()) if return_mean else out

    def get_reconstruction_error(
        self,
        adata: Any = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        dataloader: Iterable[dict[str, Any]] | None = None,
        return_mean: bool = True,
        data_loader_kwargs: dict | None = None,
        *,
        seed: int | None = None,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        layer: str | None = None,
        gene_key: str | None = None,
        unseen_as: Mapping[str, Any] | None = None,
        progress_bar: bool = False,
        first_key: int = 0,
    ) -> dict[str, float | np.ndarray]:
        """As :meth:`scvi_onnx.OnnxSCVI.get_reconstruction_error`, computed by the server."""
        from ..api.base import _no_loader_kwargs

        _no_loader_kwargs(data_loader_kwargs)
        check_positive_int("batch_size", batch_size, allow_none=True)
        res, _, _ = self._run(
            adata,
            indices,
            list(self.rec_keys),
            {"seed": self._seed(seed)},
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            layer=layer,
            gene_key=gene_key,
            unseen_as=unseen_as,
            progress_bar=progress_bar,
            first_key=first_key,
            dataloader=dataloader,
        )
        return {k: float(res[k].mean()) if return_mean else res[k] for k in self.rec_keys}

    def get_marginal_ll(
        self,
        adata: Any = None,
        indices: Sequence[int] | None = None,
        n_mc_samples: int = 1_000,
        batch_size: int | None = None,
        return_mean: bool = True,
        dataloader: Iterable[dict[str, Any]] | None = None,
        data_loader_kwargs: dict | None = None,
        *,
        n_mc_samples_per_pass: int | None = None,
        seed: int | None = None,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        layer: str | None = None,
        gene_key: str | None = None,
        unseen_as: Mapping[str, Any] | None = None,
        progress_bar: bool = False,
        first_key: int = 0,
    ) -> float | np.ndarray:
        """As :meth:`scvi_onnx.OnnxSCVI.get_marginal_ll`, computed by the server
        (``n_mc_samples_per_pass`` is the server's memory knob: checked, not sent)."""
        from ..api.base import _no_loader_kwargs
        from ..methods.engine import DEFAULT_BATCH_SIZE
        from ..methods.marginal_ll import mean_of_minibatch_means

        _no_loader_kwargs(data_loader_kwargs)
        bs = check_positive_int("batch_size", batch_size, allow_none=True) or DEFAULT_BATCH_SIZE
        n_mc_samples = check_positive_int("n_mc_samples", n_mc_samples)
        check_positive_int("n_mc_samples_per_pass", n_mc_samples_per_pass, allow_none=True)
        res, _, _ = self._run(
            adata,
            indices,
            ["marginal_ll"],
            {"seed": self._seed(seed), "n_mc_samples": n_mc_samples},
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            layer=layer,
            gene_key=gene_key,
            unseen_as=unseen_as,
            progress_bar=progress_bar,
            first_key=first_key,
            dataloader=dataloader,
        )
        cells = res["marginal_ll"]
        if return_mean:
            # the library's reduction: minibatches of batch_size cells in the selection's order
            return mean_of_minibatch_means([cells[i : i + bs] for i in range(0, cells.size, bs)])
        return cells


class RemoteSCANVI(RemoteModel):
    """A served SCANVI model: :class:`RemoteModel` plus ``predict`` and ``labels``."""

    @property
    def labels(self) -> tuple:
        """The labels the classifier predicts, in scvi-tools' column order."""
        return tuple(self._meta["parameters"]["labels"])

    @property
    def unlabeled_category(self) -> Any:
        return self._meta["parameters"].get("unlabeled_category")

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    def predict(
        self,
        adata: Any = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        use_posterior_mean: bool = True,
        dataloader: Iterable[dict[str, Any]] | None = None,
        *,
        seed: int | None = None,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        layer: str | None = None,
        gene_key: str | None = None,
        unseen_as: Mapping[str, Any] | None = None,
        progress_bar: bool = False,
        first_key: int = 0,
    ) -> np.ndarray | pd.DataFrame:
        """As :meth:`scvi_onnx.OnnxSCANVI.predict`, computed by the server."""
        import pandas as pd

        check_positive_int("batch_size", batch_size, allow_none=True)
        res, data, idx = self._run(
            adata,
            indices,
            ["label_probabilities"],
            {"seed": self._seed(seed), "use_posterior_mean": bool(use_posterior_mean)},
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            layer=layer,
            gene_key=gene_key,
            unseen_as=unseen_as,
            progress_bar=progress_bar,
            first_key=first_key,
            dataloader=dataloader,
        )
        probs = res["label_probabilities"]
        labels = self.labels
        if not soft:
            return np.array([labels[c] for c in probs.argmax(axis=1)])
        return pd.DataFrame(probs, columns=list(labels), index=data.obs_names[idx])


def connect(
    url: str,
    token: str | None = None,
    *,
    model: str | None = None,
    adata: Any = None,
    seed: int = 0,
    token_file: str | None = None,
    cafile: str | None = None,
    timeout: float = 300.0,
    retries: int = 5,
    chunk_cells: int | None = None,
    concurrency: int | None = None,
) -> RemoteModel:
    """A model served by ``scvi-onnx serve``, with the local model's methods.

    Parameters
    ----------
    url
        The model's URL, ``http(s)://host:port/v2/models/NAME``, or the server's
        ``http(s)://host:port`` with ``model=NAME`` (or with neither when it serves one model).
    token
        The server's bearer token (default: the ``SCVI_ONNX_TOKEN`` environment variable, or
        the first line of ``token_file``).
    model
        The served model's name, when ``url`` is the server's.
    adata
        Default AnnData of the methods called with ``adata=None`` (as ``load``'s).
    seed
        Default seed of the stochastic methods (as ``load``'s).
    token_file
        A file holding the token.
    cafile
        CA certificate(s) to trust for an ``https`` server with a private certificate.
    timeout
        Seconds to wait for one response.
    retries
        Times a request answered 503/429 (busy) or failing to connect is sent again.
    chunk_cells
        Cells per request (default: as many as the server's limits allow, at most its
        ``max_cells``). Results do not depend on it.
    concurrency
        Requests in flight at once, each on its own connection (default: the server's worker
        processes, ``parameters.workers``: 1 unless it runs ``serve --workers N``). The
        counts of one request more than that are in memory at once. Results do not depend on
        it.

    Returns
    -------
    :class:`RemoteModel` (:class:`RemoteSCANVI` for a SCANVI model, with ``predict``).
    """
    if token is None and token_file is not None:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    if token is None:
        token = os.environ.get("SCVI_ONNX_TOKEN") or None
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    prefix = "/v2/models/"
    if prefix in path + "/":
        name_part = path.split(prefix, 1)[1].split("/")[0] if path.count("/") >= 3 else ""
        if model is not None and name_part and model != name_part:
            raise InvalidArgumentError(f"url names model {name_part!r} but model={model!r}")
        model = model or name_part or None
    base = f"{parts.scheme}://{parts.netloc}"
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArgumentError(f"retries must be an integer >= 0, got {retries!r}")
    t = _Transport(base, token=token, cafile=cafile, timeout=timeout, retries=retries)
    if model is None:
        served = t.json("GET", "/v2/models")["models"]
        if len(served) != 1:
            raise InvalidArgumentError(
                f"{base} serves {len(served)} models ({', '.join(m['name'] for m in served)}); "
                "name one: connect(url + '/v2/models/NAME') or model=NAME"
            )
        model = served[0]["name"]
    meta = t.json("GET", f"/v2/models/{quote(model)}")
    cls = RemoteSCANVI if "labels" in meta.get("parameters", {}) else RemoteModel
    return cls(
        t, model, meta, adata=adata, seed=seed, chunk_cells=chunk_cells, concurrency=concurrency
    )
