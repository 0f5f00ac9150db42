"""The runtime model: scvi-tools' four ``VAEMixin`` methods over ONNX graphs and numpy.

Thread safety: a loaded :class:`OnnxSCVI` may be called from many threads at once. ONNX Runtime
sessions are thread-safe, the model holds no mutable state after loading, and the Monte-Carlo
noise is a pure function of (seed, cell, draw) (see :mod:`scvi_onnx.rng`), so concurrent calls
give the same numbers as serial ones.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import bundle as B
from . import distributions as D
from . import rng
from ._threads import ordered_map
from .data import (
    BATCH_KEY,
    CAT_COVS_KEY,
    CELL_INDEX_KEY,
    CONT_COVS_KEY,
    LABELS_KEY,
    NONZERO_KEY,
    SIZE_FACTOR_KEY,
    X_KEY,
    AnnDataSource,
    normalize_dataloader,
    resolve_indices,
)
from .entries import Entries
from .errors import InvalidArgumentError
from .likelihood import (
    TABLE_MAX_COUNT,
    TABLE_MAX_ENTRIES,
    MinibatchScorer,
    count_constant,
    lgamma_table,
    poisson_count_constant,
)
from .session import CUDA, create_session

logger = logging.getLogger(__name__)

#: scvi-tools' ``settings.batch_size``: the default minibatch, which also groups cells for
#: ``get_marginal_ll(return_mean=True)`` (a mean of per-minibatch means, as in scvi-tools).
DEFAULT_BATCH_SIZE = 128
#: Upper bound on elements of one (samples x cells x genes) decoder output per session call.
DECODER_CHUNK_ELEMENTS = 1 << 21
#: Cells x genes of one unit of work for the per-cell methods: minibatches are split into
#: tasks of at most this many elements (memory; per-cell results do not change).
TASK_ELEMENTS = 1 << 19
#: The same two bounds on CUDA, where one call must carry enough work to hide its launches.
CUDA_DECODER_CHUNK_ELEMENTS = 1 << 26
CUDA_TASK_ELEMENTS = 1 << 23
#: ``scoring=`` choices: where log p(x | z) is reduced over genes.
SCORING = ("auto", "host", "graph")
#: Fewest Monte-Carlo samples per marginal-LL task (cells are split into groups to get them).
MLL_MIN_SAMPLES = 32
#: Most worker threads by default (ONNX Runtime and numpy release the GIL).
MAX_DEFAULT_THREADS = 8

_LN_MEAN_CHUNK = 500
#: Minibatch field added by :meth:`OnnxSCVI._with_constants`: log of the observed library.
_LOG_LIBRARY = "_log_library"

#: Bundle ``model_class`` -> (runtime module, class); :func:`load` picks the class.
MODEL_CLASSES = {
    "SCVI": ("scvi_onnx.model", "OnnxSCVI"),
    "LinearSCVI": ("scvi_onnx.linear", "OnnxLinearSCVI"),
    "SCANVI": ("scvi_onnx.scanvi", "OnnxSCANVI"),
}


def dispersion_table(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """``exp(px_r)``: ``(G,)`` for ``gene``, one row per batch / label ``(C, G)`` for
    ``gene-batch`` / ``gene-label`` (not for ``gene-cell``, whose dispersion is a decoder head)."""
    px_r = arrays[B.ARR_PX_R]
    return np.exp(px_r) if px_r.ndim == 1 else np.ascontiguousarray(np.exp(px_r.T))


def cell_codes(config: dict[str, Any], batch: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each cell's row of a ``(C, G)`` dispersion table: its batch or label code."""
    return (batch if config["dispersion"] == "gene-batch" else labels).reshape(-1)


def theta_from_arrays(
    config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    px_r_graph: np.ndarray | None,
    batch: np.ndarray,
    labels: np.ndarray,
) -> np.ndarray:
    """Dispersion (NB inverse dispersion, or Normal scale) as scvi-tools' ``generative``.

    ``gene``: ``exp(px_r)`` (G,); ``gene-batch`` / ``gene-label``: the column of each cell's
    batch / label, (N, G); ``gene-cell``: ``exp`` of the decoder head output. The same two
    helpers (:func:`dispersion_table`, :func:`cell_codes`) serve :class:`OnnxSCVI`, so export
    validation and ``verify`` check the runtime's own selection.
    """
    if config["dispersion"] == "gene-cell":
        return np.exp(px_r_graph)
    table = dispersion_table(config, arrays)
    return table if table.ndim == 1 else table[cell_codes(config, batch, labels)]


class _GraphCounts(NamedTuple):
    """A minibatch's counts on the scoring graph's device, and its per-cell count terms."""

    counts: Any  # onnxruntime.OrtValue
    const: np.ndarray | None


def _softmax(a: np.ndarray, axis: int) -> np.ndarray:
    from scipy.special import softmax  # on first use: scipy.special adds ~0.2 s to an import

    return softmax(a, axis=axis)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    from scipy.special import logsumexp

    return logsumexp(a, axis=axis)


def _entries(mb: dict[str, Any]) -> Entries:
    """The minibatch's non-zero counts: as the source gave them, or read from the dense X."""
    e = mb.get(NONZERO_KEY)
    return Entries.from_dense(mb[X_KEY]) if e is None else e


def _observed_log_library(mb: dict[str, Any]) -> np.ndarray:
    """Log of each cell's total count (the observed library size), float64."""
    e = _entries(mb)
    return np.log(e.row_sums(e.vals))


def _rows(arrays: dict[str, Any], rows: slice) -> dict[str, Any]:
    """The same per-cell arrays (and entries) for a slice of the cells."""
    return {k: v.rows(rows) if isinstance(v, Entries) else v[rows] for k, v in arrays.items()}


def check_seed(seed: Any) -> int:
    """A seed must be an integer (not a bool, float or string)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgumentError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def _check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class OnnxSCVI:
    """A frozen SCVI model loaded from a bundle; use :func:`scvi_onnx.load` to create one.

    Attributes
    ----------
    manifest
        The bundle's :class:`~scvi_onnx.bundle.Manifest`.
    provider
        The ONNX Runtime execution provider that runs the graphs.
    seed
        Default seed of the stochastic methods.
    """

    def __init__(
        self,
        path: str | Path,
        adata: Any = None,
        *,
        device: str = "auto",
        seed: int = 0,
        verify_checksums: bool = True,
        intra_op_threads: int | None = None,
        n_threads: int | None = None,
        scoring: str = "auto",
    ):
        self.path = Path(path)
        self.manifest = B.read_manifest(self.path, check_files=verify_checksums)
        if self.manifest.model_class not in MODEL_CLASSES:
            raise B.BundleError(
                f"bundle holds a {self.manifest.model_class} model; this runtime reads "
                f"{', '.join(MODEL_CLASSES)}"
            )
        self.config = self.manifest.config
        self.seed = check_seed(seed)
        self._arrays = B.load_npz(self.path / B.ARRAYS_FILE)
        self._check_arrays()
        self._enc, self.provider = create_session(
            self.path / B.ENCODER_FILE, device, intra_op_threads=intra_op_threads
        )
        self._dec, _ = create_session(
            self.path / B.DECODER_FILE, device, intra_op_threads=intra_op_threads
        )
        self._enc_in = tuple(i.name for i in self._enc.get_inputs())
        self._enc_out = tuple(o.name for o in self._enc.get_outputs())
        self._dec_in = tuple(i.name for i in self._dec.get_inputs())
        self._dec_out = tuple(o.name for o in self._dec.get_outputs())
        cuda = self.provider == CUDA
        self._chunk = CUDA_DECODER_CHUNK_ELEMENTS if cuda else DECODER_CHUNK_ELEMENTS
        self._task_elements = CUDA_TASK_ELEMENTS if cuda else TASK_ELEMENTS
        self._score = self._score_session(scoring, device, intra_op_threads)
        self._score_in = (
            () if self._score is None else tuple(i.name for i in self._score.get_inputs())
        )
        c = self.config
        self._learned_library = not c["use_observed_lib_size"]
        self._ln = c["latent_distribution"] == "ln"
        self._lik = c["gene_likelihood"]
        if self._learned_library:
            self._lib_means = self._arrays[B.ARR_LIB_MEANS].reshape(-1).astype(np.float64)
            self._lib_vars = self._arrays[B.ARR_LIB_VARS].reshape(-1).astype(np.float64)
        self._n_workers = int(n_threads or min(os.cpu_count() or 1, MAX_DEFAULT_THREADS))
        # Reader threads that densify and check the next minibatches while the workers
        # compute. Measured over 1M backed cells on 2 CPUs: ELBO 23.7 -> 15.7 s (427 -> 479 MB
        # peak); the latent space ~20% faster, but its memory crept up with the number of
        # cells (glibc arenas of one more thread: 340 -> 470 MB, flat without), so the CPU
        # latent space reads on the calling thread. On CUDA the host's data path bounds the
        # latent space: reader threads there too.
        self._prefetch = max(1, self._n_workers // 2) if self._n_workers > 1 else 0
        self._latent_prefetch = self._prefetch if cuda else 0
        # Dispersion that does not depend on z: exp(px_r) per gene, or per batch / label
        # (rows). Its lgamma table for the count terms is built on first use (the latent
        # space needs none of it); both are never modified.
        self._theta = None
        if self._lik != "poisson" and c["dispersion"] != "gene-cell":
            self._theta = dispersion_table(c, self._arrays)
        if self._enc.get_inputs()[0].shape[-1] not in (len(self.genes), None, "n_genes"):
            raise B.BundleIntegrityError(
                f"{B.ENCODER_FILE} takes {self._enc.get_inputs()[0].shape[-1]} genes but the "
                f"manifest lists {len(self.genes)}; re-export the bundle"
            )
        self.adata = adata
        logger.info("loaded %s (%s) on %s", self.path, self.manifest.model_class, self.provider)

    @functools.cached_property
    def _theta_table(self) -> np.ndarray | None:
        """The :func:`lgamma_table` of the fixed dispersion, if small enough; built on first
        use (threads that race here build the same table)."""
        if self._theta is None or self._lik not in ("nb", "zinb"):
            return None
        if self._theta.size * TABLE_MAX_COUNT > TABLE_MAX_ENTRIES:
            return None
        return lgamma_table(self._theta)

    def _score_session(self, scoring: str, device: str, intra_op_threads: int | None):
        """The scoring graph's session when log p(x | z) is reduced beside the decoder.

        ``"auto"``: on CUDA when the bundle has the graph (decoder outputs, samples x cells x
        genes, never come back to the host); on the CPU numpy's kernel is faster than ONNX
        Runtime's elementwise kernels. ``"host"``: never. ``"graph"``: always (an error if the
        bundle has none).
        """
        if scoring not in SCORING:
            raise InvalidArgumentError(f"scoring must be one of {SCORING}, got {scoring!r}")
        has = "scorer" in self.manifest.graphs
        if scoring == "graph" and not has:
            raise InvalidArgumentError(
                "scoring='graph' but this bundle has no scoring graph (SCANVI, gene-cell "
                "dispersion, or exported before scvi-onnx 0.2); re-export it or use "
                "scoring='host'"
            )
        if scoring == "host" or not has or (scoring == "auto" and self.provider != CUDA):
            return None
        sess, _ = create_session(
            self.path / B.SCORER_FILE, device, intra_op_threads=intra_op_threads
        )
        return sess

    def _check_arrays(self) -> None:
        """Required arrays present with the manifest's shapes (fail at load, not mid-call)."""
        c, G = self.config, len(self.manifest.genes)
        want: dict[str, tuple] = {}
        if c["gene_likelihood"] != "poisson" and c["dispersion"] != "gene-cell":
            want[B.ARR_PX_R] = {
                "gene": (G,),
                "gene-batch": (G, c["n_batch"]),
                "gene-label": (G, c["n_labels"]),
            }[c["dispersion"]]
        if not c["use_observed_lib_size"]:
            want[B.ARR_LIB_MEANS] = want[B.ARR_LIB_VARS] = (1, c["n_batch"])
        for name, shape in want.items():
            arr = self._arrays[name]  # a missing array is a BundleIntegrityError
            if arr.shape != shape:
                raise B.BundleIntegrityError(
                    f"{B.ARRAYS_FILE}: {name} has shape {arr.shape}, expected {shape} for this "
                    "model; re-export the bundle"
                )

    # ------------------------------------------------------------------ description
    @property
    def genes(self) -> tuple[str, ...]:
        return self.manifest.genes

    @property
    def n_latent(self) -> int:
        return int(self.config["n_latent"])

    def __repr__(self) -> str:
        c = self.config
        return (
            f"OnnxSCVI(path={str(self.path)!r}, genes={len(self.genes)}, n_latent={c['n_latent']}, "
            f"gene_likelihood={c['gene_likelihood']!r}, dispersion={c['dispersion']!r}, "
            f"n_batch={c['n_batch']}, provider={self.provider!r})"
        )

    # ------------------------------------------------------------------ data
    def gene_overlap(self, adata: Any) -> dict[str, Any]:
        """How many of the model's genes ``adata`` has (matched by name).

        Returns
        -------
        ``{"n_model_genes", "n_found", "fraction", "missing" (list, in model order),
        "n_extra"}``.
        """
        var = getattr(adata, "var_names", None)
        if var is None:
            raise InvalidArgumentError(f"expected an AnnData, got {type(adata).__name__}")
        present = set(map(str, var))
        missing = [g for g in self.genes if g not in present]
        n_found = len(self.genes) - len(missing)
        return {
            "n_model_genes": len(self.genes),
            "n_found": n_found,
            "fraction": n_found / len(self.genes),
            "missing": missing,
            "n_extra": len(present) - n_found,
        }

    def _source_options(self) -> dict[str, Any]:
        """Extra :class:`~scvi_onnx.data.AnnDataSource` options of this model class."""
        return {}

    def _minibatches(
        self,
        adata: Any,
        indices: Sequence[int] | None,
        batch_size: int | None,
        dataloader: Iterable[dict[str, Any]] | None,
        *,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        progress: bool = False,
        scoring: bool = True,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Normalized minibatches of ``adata`` (or a user dataloader).

        ``scoring``: the minibatches will be scored (count terms, observed library), so they
        carry the source's non-zero entries; the latent space and predictions need neither
        (holding them longer only keeps memory busy), and read with ``_latent_prefetch``
        reader threads."""
        batch_size = _check_positive_int("batch_size", batch_size, allow_none=True)
        need_lib = self.config["use_observed_lib_size"] and not self.config["use_size_factor_key"]
        count = self._lik != "normal"
        if dataloader is not None:
            if adata is not None:
                raise InvalidArgumentError("pass either adata or dataloader, not both")
            it = normalize_dataloader(
                dataloader, self.manifest, require_positive_library=need_lib, count_data=count
            )
            total = None
        else:
            adata = self.adata if adata is None else adata
            if adata is None:
                raise InvalidArgumentError(
                    "no data: pass adata= (or dataloader=), or bind an AnnData at "
                    "scvi_onnx.load(path, adata=...)"
                )
            src = AnnDataSource(
                adata,
                self.manifest,
                missing_genes=missing_genes,
                min_gene_overlap=min_gene_overlap,
                require_positive_library=need_lib,
                **self._source_options(),
                count_data=count,
            )
            idx = resolve_indices(indices, src.n_obs)
            bs = batch_size or DEFAULT_BATCH_SIZE
            prefetch = self._prefetch if scoring else self._latent_prefetch
            it = src.minibatches(idx, bs, prefetch=prefetch, entries=scoring)
            total = math.ceil(len(idx) / bs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=total, unit="batch", leave=False)
        yield from it

    # ------------------------------------------------------------------ graphs
    def _feeds(self, names: Sequence[str], mb: dict[str, np.ndarray], **extra) -> dict:
        src = {
            B.IN_X: mb.get(X_KEY),
            B.IN_X_LOG1P: np.log1p(mb[X_KEY]) if B.IN_X_LOG1P in names else None,
            B.IN_BATCH: mb.get(BATCH_KEY),
            B.IN_CAT: mb.get(CAT_COVS_KEY),
            B.IN_CONT: mb.get(CONT_COVS_KEY),
            **extra,
        }
        return {n: src[n] for n in names}

    def _encode(self, mb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._enc.run(None, self._feeds(self._enc_in, mb))
        return dict(zip(self._enc_out, out, strict=True))

    def _decode(self, mb, z: np.ndarray, library: np.ndarray) -> dict[str, np.ndarray]:
        feeds = self._feeds(
            self._dec_in,
            mb,
            **{
                B.IN_Z: np.ascontiguousarray(z, dtype=np.float32),
                B.IN_LIBRARY: np.ascontiguousarray(library, dtype=np.float32),
            },
        )
        out = self._dec.run(None, feeds)
        return dict(zip(self._dec_out, out, strict=True))

    # ------------------------------------------------------------------ pieces of the maths
    def _z_samples(self, mb, enc, seed: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(untransformed, transformed) z of shape (n, cells, L) for draws start..start+n."""
        cells = mb[CELL_INDEX_KEY]
        L = self.n_latent
        eps = rng.normals(seed, rng.STREAM_Z, cells, n * L, start=start * L)
        eps = eps.reshape(len(cells), n, L).transpose(1, 0, 2)
        m = enc[B.OUT_QZ_M].astype(np.float64)
        s = np.sqrt(enc[B.OUT_QZ_V].astype(np.float64))
        u = m[None] + eps * s[None]
        return u, (_softmax(u, axis=-1) if self._ln else u)

    def _library(self, mb, enc, seed: int, start: int, n: int) -> np.ndarray:
        """Library (log scale) fed to the decoder, shape (n or 1, cells, 1)."""
        c = self.config
        if c["use_size_factor_key"]:
            return np.log(mb[SIZE_FACTOR_KEY].astype(np.float64))[None]
        if c["use_observed_lib_size"]:
            log_lib = mb.get(_LOG_LIBRARY)
            if log_lib is None:
                log_lib = _observed_log_library(mb)
            return log_lib[None, :, None]
        cells = mb[CELL_INDEX_KEY]
        eps = rng.normals(seed, rng.STREAM_L, cells, n, start=start).T[:, :, None]
        m = enc[B.OUT_QL_M].astype(np.float64)[None]
        s = np.sqrt(enc[B.OUT_QL_V].astype(np.float64))[None]
        return m + eps * s

    def _with_constants(self, mb: dict[str, Any]) -> dict[str, Any]:
        """The minibatch plus what is computed once from its counts and shared by every
        sample: its non-zero entries and the observed library."""
        c = self.config
        need_lib = c["use_observed_lib_size"] and not c["use_size_factor_key"]
        count_terms = self._lik == "poisson" or (
            self._lik in ("nb", "zinb") and self._theta is not None
        )
        if not (need_lib or count_terms):
            return mb
        out = {**mb, NONZERO_KEY: _entries(mb)}
        if need_lib:
            out[_LOG_LIBRARY] = _observed_log_library(out)
        return out

    def _library_prior(self, mb) -> tuple[np.ndarray, np.ndarray]:
        b = mb[BATCH_KEY].reshape(-1)
        return self._lib_means[b][:, None], self._lib_vars[b][:, None]

    def _scorer(self, mb) -> MinibatchScorer | _GraphCounts:
        """Per-minibatch likelihood state: counts, fixed dispersion, lgamma count terms.

        With the scoring graph: the counts as a session-device value (sent once, used by every
        sample chunk) and the per-cell count terms the graph leaves out.
        """
        x = mb[X_KEY]
        theta = const = codes = None
        if self._theta is not None:
            if self._theta.ndim == 1:
                theta = self._theta
            else:
                codes = cell_codes(self.config, mb[BATCH_KEY], mb[LABELS_KEY])
                theta = self._theta[codes]
            if self._lik in ("nb", "zinb"):
                const = count_constant(
                    _entries(mb), theta, self._theta_table, codes, likelihood=self._lik
                )
        if self._lik == "poisson":
            const = poisson_count_constant(_entries(mb))
        if self._score is not None:
            import onnxruntime as ort

            where = "cuda" if self.provider == CUDA else "cpu"
            counts = np.ascontiguousarray(x, dtype=np.float32)
            return _GraphCounts(ort.OrtValue.ortvalue_from_numpy(counts, where, 0), const)
        return MinibatchScorer(self._lik, x, theta, const)

    def _log_px_at(self, mb, scorer, z: np.ndarray, library: np.ndarray) -> np.ndarray:
        """log p(x | z, l) summed over genes, (samples, cells): the decoder's outputs scored
        on the host, or the scoring graph's sums plus the per-cell count terms."""
        if not isinstance(scorer, _GraphCounts):
            return self._log_px(scorer, self._decode(mb, z, library))
        binding = self._score.io_binding()
        feeds = self._feeds(
            [n for n in self._score_in if n != B.IN_COUNTS],
            mb,
            **{
                B.IN_Z: np.ascontiguousarray(z, dtype=np.float32),
                B.IN_LIBRARY: np.ascontiguousarray(library, dtype=np.float32),
                B.IN_LABELS: mb.get(LABELS_KEY),
            },
        )
        binding.bind_ortvalue_input(B.IN_COUNTS, scorer.counts)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(B.OUT_LOG_PX, "cpu")
        self._score.run_with_iobinding(binding)
        out = binding.copy_outputs_to_cpu()[0].astype(np.float64)
        return out if scorer.const is None else out + scorer.const

    def _log_px(self, scorer: MinibatchScorer, dec: dict[str, np.ndarray]) -> np.ndarray:
        """log p(x | z, l) summed over genes, shape (samples, cells)."""
        theta = np.exp(dec[B.OUT_PX_R]) if B.OUT_PX_R in dec else None
        return scorer.score(dec[B.OUT_PX_RATE], dec.get(B.OUT_PX_DROPOUT), theta)

    def _tasks(self, mbs: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """Split minibatches into tasks of at most ``TASK_ELEMENTS`` cells x genes."""
        step = max(1, self._task_elements // len(self.genes))
        for mb in mbs:
            n = len(mb[CELL_INDEX_KEY])
            if n <= step:
                yield mb
                continue
            for start in range(0, n, step):
                yield _rows(mb, slice(start, start + step))

    def _pmap(self, fn: Callable, items: Iterable) -> Iterator:
        """``map(fn, items)`` on the worker threads, in order, with bounded work in flight."""
        return ordered_map(fn, items, self._n_workers if self._n_workers > 1 else 0, "scvi-onnx")

    def _elbo_terms(self, mb, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-cell (reconstruction loss, kl_z + kl_l) for one posterior draw."""
        enc = self._encode(mb)
        _, z = self._z_samples(mb, enc, seed, 0, 1)
        library = self._library(mb, enc, seed, 0, 1)
        rec = -self._log_px_at(mb, self._scorer(mb), z, library)[0]
        kl = D.kl_normal_standard(
            enc[B.OUT_QZ_M].astype(np.float64), enc[B.OUT_QZ_V].astype(np.float64)
        ).sum(-1)
        if self._learned_library:
            pm, pv = self._library_prior(mb)
            kl = kl + D.kl_normal(
                enc[B.OUT_QL_M].astype(np.float64), enc[B.OUT_QL_V].astype(np.float64), pm, pv
            ).sum(-1)
        return rec, kl

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
        progress_bar: bool = False,
        **data_loader_kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent representation of the cells, as ``scvi.model.SCVI.get_latent_representation``.

        Parameters
        ----------
        adata
            AnnData with the model's genes (matched by name). Defaults to the one bound at load.
        indices
            Cells of ``adata`` to use (integers or a boolean mask). Default: all.
        give_mean
            Return the posterior mean (for ``latent_distribution="ln"``, a Monte-Carlo mean of
            ``softmax(z)`` over ``mc_samples`` draws); else one posterior draw.
        mc_samples
            Draws for the logistic-normal mean.
        batch_size
            Cells per minibatch (memory only: results do not depend on it).
        return_dist
            Return ``(qz_mean, qz_var)`` of the (untransformed) Gaussian posterior.
        dataloader
            Iterable of minibatch dicts keyed like scvi-tools' registry (``X``, ``batch``, ...),
            used instead of ``adata``.
        seed
            Seed of the draws (default: the model's ``seed``).
        missing_genes
            ``"error"`` (default) or ``"zero"`` to fill genes missing from ``adata`` with zeros
            (as scvi-tools' ``prepare_query_anndata``); see :meth:`gene_overlap`.
        min_gene_overlap
            With ``missing_genes="zero"``, the smallest fraction of the model's genes that must
            be present (default 0.8, as scvi-tools); pass 0 to accept any overlap.
        progress_bar
            Show a progress bar over minibatches.

        Returns
        -------
        ``(n_cells, n_latent)`` float32 array, or the tuple ``(mean, var)`` if ``return_dist``.
        """
        seed = self.seed if seed is None else check_seed(seed)
        if give_mean and self._ln and not return_dist:
            _check_positive_int("mc_samples", mc_samples)
        L = self.n_latent

        def one(mb):
            enc = self._encode(mb)
            if return_dist:
                return enc[B.OUT_QZ_M], enc[B.OUT_QZ_V]
            if give_mean and not self._ln:
                return enc[B.OUT_QZ_M], None
            if not give_mean:
                return self._z_samples(mb, enc, seed, 0, 1)[1][0].astype(np.float32), None
            m = enc[B.OUT_QZ_M].astype(np.float64)
            s = np.sqrt(enc[B.OUT_QZ_V].astype(np.float64))
            acc = np.zeros_like(m)
            for start in range(0, mc_samples, _LN_MEAN_CHUNK):
                n = min(_LN_MEAN_CHUNK, mc_samples - start)
                eps = rng.normals(
                    seed, rng.STREAM_LN_MEAN, mb[CELL_INDEX_KEY], n * L, start=start * L
                ).reshape(len(m), n, L)
                acc += _softmax(m[:, None] + eps * s[:, None], axis=-1).sum(1)
            return (acc / mc_samples).astype(np.float32), None

        mbs = self._minibatches(
            adata,
            indices,
            batch_size,
            dataloader,
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            progress=progress_bar,
            scoring=False,
        )
        parts = list(self._pmap(one, self._tasks(mbs)))
        zs = [p[0] for p in parts]
        if return_dist:
            return np.concatenate(zs), np.concatenate([p[1] for p in parts])
        return np.concatenate(zs)

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
        progress_bar: bool = False,
        **kwargs: Any,
    ) -> float | np.ndarray:
        """Evidence lower bound per cell (or its mean), as ``SCVI.get_elbo``.

        ``elbo = -(reconstruction_loss + kl_z + kl_l)`` with one posterior draw per cell
        (``kl_weight`` is not applied). Higher is better.

        Returns
        -------
        The mean ELBO (float) if ``return_mean``, else a ``(n_cells,)`` array.
        """
        rec, kl = self._per_cell_elbo_terms(
            adata,
            indices,
            batch_size,
            dataloader,
            seed,
            missing_genes,
            min_gene_overlap,
            progress_bar,
        )
        out = -(rec + kl)
        return float(out.mean()) if return_mean else out

    def _per_cell_elbo_terms(
        self,
        adata,
        indices,
        batch_size,
        dataloader,
        seed,
        missing_genes,
        min_gene_overlap,
        progress_bar,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-cell (reconstruction loss, KL) over the input, one posterior draw per cell."""
        seed = self.seed if seed is None else check_seed(seed)
        mbs = self._minibatches(
            adata,
            indices,
            batch_size,
            dataloader,
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            progress=progress_bar,
        )

        def one(mb):
            return self._elbo_terms(self._with_constants(mb), seed)

        parts = list(self._pmap(one, self._tasks(mbs)))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

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
        progress_bar: bool = False,
        **kwargs: Any,
    ) -> dict[str, float | np.ndarray]:
        """Reconstruction loss ``-log p(x | z, l)`` for one posterior draw, as scvi-tools.

        Returns
        -------
        ``{"reconstruction_loss": mean}`` (a float) or per-cell ``(n_cells,)`` array. The value
        is a negative log-likelihood: lower is better (scvi-tools' docstring says otherwise; the
        numbers are what we match).
        """
        out, _ = self._per_cell_elbo_terms(
            adata,
            indices,
            batch_size,
            dataloader,
            seed,
            missing_genes,
            min_gene_overlap,
            progress_bar,
        )
        return {"reconstruction_loss": float(out.mean()) if return_mean else out}

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
        progress_bar: bool = False,
        **kwargs: Any,
    ) -> float | np.ndarray:
        """Importance-sampled marginal log-likelihood, as ``SCVI.get_marginal_ll``.

        ``log mean_s exp(log p(z_s) + log p(x | z_s, l_s) - log q(z_s | x)
        [+ log p(l_s) - log q(l_s | x)])`` over ``n_mc_samples`` posterior draws.

        Parameters
        ----------
        n_mc_samples
            Importance samples per cell.
        n_mc_samples_per_pass
            Samples per decoder call (memory knob; default: as many as fit
            ``DECODER_CHUNK_ELEMENTS``). Results do not depend on it.

        Returns
        -------
        With ``return_mean``, the mean over minibatches of the per-minibatch means (exactly
        scvi-tools' reduction; minibatches of ``batch_size`` cells, default 128); else a
        ``(n_cells,)`` array.
        """
        seed = self.seed if seed is None else check_seed(seed)
        n_mc_samples = _check_positive_int("n_mc_samples", n_mc_samples)
        per_pass = _check_positive_int(
            "n_mc_samples_per_pass", n_mc_samples_per_pass, allow_none=True
        )
        mbs = self._minibatches(
            adata,
            indices,
            batch_size,
            dataloader,
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            progress=progress_bar,
        )
        per_cell = list(self._marginal_ll_chunks(mbs, n_mc_samples, per_pass, seed))
        if return_mean:
            # scvi-tools: numpy mean of the per-minibatch means
            return float(np.mean([ll.mean() for ll in per_cell]))
        return np.concatenate(per_cell)

    def _marginal_ll_chunks(self, mbs, n_mc: int, per_pass: int | None, seed: int):
        """Per-minibatch marginal LL from (cell group, sample chunk) tasks on worker threads.

        A task decodes ``samples x cells`` rows, at most ``DECODER_CHUNK_ELEMENTS`` elements,
        with at least ``MLL_MIN_SAMPLES`` samples (cells split into groups): the group's counts
        stay in cache while its samples are scored. Every quantity is per cell, so the groups
        change no number.
        """
        G = len(self.genes)

        def tasks():
            for mb in mbs:
                mb = self._with_constants(mb)
                n_cells = len(mb[CELL_INDEX_KEY])
                log_w = np.empty((n_mc, n_cells))
                enc = self._encode(mb)
                group = max(1, min(n_cells, self._chunk // (G * MLL_MIN_SAMPLES)))
                step = per_pass or max(1, self._chunk // (group * G))
                step = min(step, n_mc)
                groups = range(0, n_cells, group)
                for c in groups:
                    cs = slice(c, min(n_cells, c + group))
                    sub = mb if cs.stop - cs.start == n_cells else _rows(mb, cs)
                    sub_enc = enc if sub is mb else _rows(enc, cs)
                    scorer = self._scorer(sub)
                    for start in range(0, n_mc, step):
                        n = min(step, n_mc - start)
                        last = c == groups[-1] and start + n == n_mc
                        yield log_w, last, sub, sub_enc, scorer, cs, start, n

        def run(task):
            log_w, last, mb, enc, scorer, cs, start, n = task
            log_w[start : start + n, cs] = self._log_weights(mb, enc, scorer, seed, start, n)
            return log_w, last

        for log_w, last in self._pmap(run, tasks()):
            if last:
                yield _logsumexp(log_w, axis=0) - np.log(n_mc)

    def _log_weights(self, mb, enc, scorer, seed: int, start: int, n: int) -> np.ndarray:
        """Importance log-weights of draws start..start+n, shape (n, cells)."""
        _, z = self._z_samples(mb, enc, seed, start, n)
        library = self._library(mb, enc, seed, start, n)
        qm = enc[B.OUT_QZ_M].astype(np.float64)[None]
        qs = np.sqrt(enc[B.OUT_QZ_V].astype(np.float64))[None]
        # scvi-tools evaluates p(z) and q(z|x) at the transformed z (softmax for "ln").
        log_w = D.log_normal(z, 0.0, 1.0).sum(-1)
        log_w += self._log_px_at(mb, scorer, z, library)
        log_w -= D.log_normal(z, qm, qs).sum(-1)
        if self._learned_library:
            pm, pv = self._library_prior(mb)
            lm = enc[B.OUT_QL_M].astype(np.float64)[None]
            ls = np.sqrt(enc[B.OUT_QL_V].astype(np.float64))[None]
            log_w += D.log_normal(library, pm[None], np.sqrt(pv)[None]).sum(-1)
            log_w -= D.log_normal(library, lm, ls).sum(-1)
        return log_w


def load(
    path: str | Path,
    adata: Any = None,
    device: str = "auto",
    seed: int = 0,
    **kwargs: Any,
) -> OnnxSCVI:
    """Load a scvi-onnx bundle as the runtime class of its model.

    :class:`OnnxSCVI` for SCVI, :class:`~scvi_onnx.linear.OnnxLinearSCVI` (adds
    ``get_loadings``) for LinearSCVI, :class:`~scvi_onnx.scanvi.OnnxSCANVI` (adds ``predict``
    and SCANVI's ELBO) for SCANVI.

    Parameters
    ----------
    path
        Bundle folder (written by ``scvi-onnx export``).
    adata
        Default AnnData for methods called with ``adata=None`` (as in scvi-tools).
    device
        ``"cpu"``, ``"cuda"``, or ``"auto"`` (CUDA only when it really works). The model's
        ``provider`` attribute says which execution provider runs.
    seed
        Default seed of the stochastic methods.
    **kwargs
        ``verify_checksums`` (default True), ``intra_op_threads`` (per session, default 1),
        ``n_threads`` (worker threads over minibatches and sample chunks; default: the CPU
        count, at most 8; results do not depend on it), ``scoring`` (where ``log p(x | z)`` is
        summed over genes: ``"auto"`` = the bundle's scoring graph on CUDA, so decoder outputs
        never come back to the host, numpy on the CPU; ``"host"``; ``"graph"``).

    Raises
    ------
    BundleError
        The folder is not a readable scvi-onnx bundle (missing, tampered, too new).
    ProviderError
        ``device="cuda"`` cannot be honoured.
    """
    import importlib

    name = B.read_manifest(path, check_files=False).model_class
    if name not in MODEL_CLASSES:
        raise B.BundleError(
            f"bundle holds a {name} model; this runtime reads {', '.join(MODEL_CLASSES)}"
        )
    module, cls = MODEL_CLASSES[name]
    model_cls = getattr(importlib.import_module(module), cls)
    return model_cls(path, adata, device=device, seed=seed, **kwargs)
