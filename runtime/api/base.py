"""The public class every model shares: scvi-tools' ``VAEMixin`` methods, torch-free.

A public class holds the signatures, docstrings and argument checks; the loops live in
:mod:`scvi_onnx.methods` and the maths of one minibatch in the model's module
(:mod:`scvi_onnx.models`).

Thread safety: a loaded model may be called from many threads at once. ONNX Runtime sessions
are thread-safe, the model holds no mutable state after loading, and the Monte-Carlo noise is a
pure function of (seed, cell, draw) (see :mod:`scvi_onnx.maths.rng`), so concurrent calls give
the same numbers as serial ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..arguments import check_first_key, check_positive_int, check_seed
from ..bundle import Manifest
from ..data import DataNeeds, Minibatch
from ..data.obs import ObsUse
from ..distributed import dask_dispatch
from ..errors import InvalidArgumentError
from ..methods import elbo as elbo_loop
from ..methods import inputs
from ..methods import latent as latent_loop
from ..methods import marginal_ll as mll_loop
from ..methods.engine import Engine
from ..models.base import Module
from ..models.registry import entry, open_bundle

logger = logging.getLogger(__name__)


def _read(
    missing_genes: str,
    min_gene_overlap: float,
    layer: str | None,
    gene_key: str | None,
    unseen_as: Mapping[str, Any] | None,
    progress_bar: bool,
    first_key: int = 0,
) -> dict[str, Any]:
    """The data options every method takes, as :meth:`OnnxVAEModel._minibatches` reads them."""
    return {
        "first_key": first_key,
        "missing_genes": missing_genes,
        "min_gene_overlap": min_gene_overlap,
        "layer": layer,
        "gene_key": gene_key,
        "unseen_as": unseen_as,
        "progress": progress_bar,
    }


def _no_loader_kwargs(data_loader_kwargs: dict | None) -> None:
    if data_loader_kwargs:
        raise InvalidArgumentError(
            f"data_loader_kwargs {sorted(data_loader_kwargs)} have no effect here (scvi-onnx "
            "reads the data itself); leave data_loader_kwargs out"
        )


class OnnxVAEModel:
    """A frozen scvi-tools model loaded from a bundle: the four ``VAEMixin`` methods.

    Use :func:`scvi_onnx.load` to create one (it picks the class of the bundle's model).

    Parameters
    ----------
    path
        Bundle folder (written by ``scvi-onnx export``).
    adata
        Default AnnData of the methods called with ``adata=None`` (as in scvi-tools).
    device
        ``"cpu"``, ``"cuda"``, or ``"auto"`` (CUDA only when it really works).
    seed
        Default seed of the stochastic methods.
    verify_checksums
        Check every bundle file's sha256 before loading (default True).
    intra_op_threads
        ONNX Runtime threads per session (default 1: bit-identical results for any batch
        size; more may change the last bit of a float32 result with the batch size).
    n_threads
        Worker threads over minibatches and Monte-Carlo chunks (default: the CPU count, at
        most 8); results do not depend on it.
    scoring
        Where ``log p(x | z)`` is summed over genes: ``"auto"`` (the bundle's scoring graph
        on CUDA, so decoder outputs never come back to the host; numpy on the CPU),
        ``"host"`` or ``"graph"``.
    input_layer
        How a PEAKVI's encoders multiply the regions: ``"auto"`` (from the non-zero entries,
        on the CPU, where the bundle has the sparse encoders (PEAKVI on 10,000 regions or
        more) and its training data was at most 5% non-zero; else the dense minibatch),
        ``"sparse"`` or ``"dense"``. The two differ by float32 rounding. Other models have
        one way.
    expected_digest
        Refuse any bundle whose digest (:attr:`digest`) is not this one.

    Attributes
    ----------
    manifest
        The bundle's :class:`~scvi_onnx.bundle.Manifest`.
    config
        The typed config of the bundle's module.
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
        input_layer: str = "auto",
        expected_digest: str | None = None,
    ):
        self.path = Path(path)
        model_entry, contents = open_bundle(
            self.path, check_files=verify_checksums, expected_digest=expected_digest
        )
        self.manifest: Manifest = contents.manifest
        self.config = contents.config
        self.seed = check_seed(seed)
        n_threads = check_positive_int("n_threads", n_threads, allow_none=True)
        module_cls = model_entry.load("module")
        self.module: Module = module_cls(
            contents,
            device=device,
            intra_op_threads=intra_op_threads,
            scoring=scoring,
            input_layer=input_layer,
        )
        self.provider = self.module.provider
        self.engine = Engine.for_provider(self.provider, n_threads)
        self.adata = adata
        #: how the model was loaded: workers of a Dask run load the bundle the same way
        self.load_options = {
            "device": device,
            "intra_op_threads": intra_op_threads,
            "scoring": scoring,
            "input_layer": input_layer,
        }
        logger.info("loaded %s (%s) on %s", self.path, self.manifest.model_class, self.provider)

    # ------------------------------------------------------------------ description
    @property
    def genes(self) -> tuple[str, ...]:
        """The model's genes, in its order."""
        return self.manifest.genes

    @property
    def n_latent(self) -> int:
        return self.module.n_latent

    @property
    def digest(self) -> str:
        """The bundle's digest, ``sha256:`` of its manifest.json (which lists every other
        file's sha256): pin it with ``load(..., expected_digest=...)``."""
        return self.manifest.digest

    def __repr__(self) -> str:
        c = self.config
        shown = "".join(f"{k}={getattr(c, k)!r}, " for k in self.module.repr_config)
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, genes={len(self.genes)}, "
            f"n_latent={c.n_latent}, {shown}n_batch={c.n_batch}, "
            f"provider={self.provider!r}{self._repr_extra()})"
        )

    def _repr_extra(self) -> str:
        return ""

    # ------------------------------------------------------------------ data
    def gene_overlap(self, adata: Any) -> dict[str, Any]:
        """How many of the model's genes ``adata`` has (matched by name).

        Parameters
        ----------
        adata
            An AnnData.

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

    def _minibatches(
        self,
        adata: Any,
        indices: Sequence[int] | None,
        batch_size: int | None,
        dataloader: Iterable[dict[str, Any]] | None,
        *,
        missing_genes: str,
        min_gene_overlap: float,
        progress: bool,
        scoring: bool,
        what: str,
        per_cell: bool = False,
        first_key: int = 0,
        layer: str | None = None,
        gene_key: str | None = None,
        unseen_as: Mapping[str, Any] | None = None,
    ) -> Iterator[Minibatch]:
        """The checked minibatches of a call: ``scoring`` ones carry what the scoring
        methods need (entries, observed library); the latent space needs neither. ``what``
        names the result in messages ("the latent space"). ``per_cell``: the results do not
        depend on how cells are grouped (a wide model's minibatches may be cut smaller)."""
        needs: DataNeeds = self.module.needs if scoring else self.module.needs.for_latent()
        use = ObsUse(used=self.module.obs_use(scoring), unseen_as=dict(unseen_as or {}), what=what)
        return inputs.minibatches(
            self.manifest,
            self.adata if adata is None and dataloader is None else adata,
            indices,
            batch_size,
            dataloader,
            needs=needs,
            prefetch=self.engine.prefetch if scoring else self.engine.latent_prefetch,
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            missing_labels_code=getattr(self.module, "missing_labels_code", None),
            use=use,
            layer=layer,
            gene_key=gene_key,
            first_key=check_first_key(first_key),
            progress=progress,
            read_cells=(
                self.engine.read_cells(
                    self.module.n_features,
                    self.module.score_task_rows if scoring else self.module.latent_call_rows,
                )
                if per_cell
                else None
            ),
        )

    def _seed(self, seed: int | None) -> int:
        return self.seed if seed is None else check_seed(seed)

    # ------------------------------------------------------------------ the four methods
    @dask_dispatch  # an AnnData whose matrix is a Dask array runs on Dask
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
        """Latent representation of the cells, as scvi-tools' ``get_latent_representation``.

        Parameters
        ----------
        adata
            AnnData with the model's genes (matched by name, in any order; extra genes are
            ignored). In memory or backed (``anndata.read_h5ad(path, backed="r")``).
            Defaults to the AnnData bound at load.
        indices
            Cells of ``adata`` to use (integer row positions or a boolean mask). Default: all.
        give_mean
            Return the posterior mean (for ``latent_distribution="ln"``, a Monte-Carlo mean of
            ``softmax(z)`` over ``mc_samples`` draws); else one posterior draw.
        mc_samples
            Draws for the logistic-normal mean.
        batch_size
            Cells per minibatch (default 128): memory only, results do not depend on it.
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
        layer
            Read the counts from ``adata.layers[layer]`` (default: where the model was trained
            to read them: ``X``, or the layer it registered).
        gene_key
            Match genes by the ``adata.var`` column ``gene_key`` (e.g. ``"feature_name"`` for
            symbols, ``"gene_ids"`` for Ensembl IDs) instead of ``adata.var_names``.
        unseen_as
            ``{obs column: training category}``: compute cells whose category the model never
            saw as that training category (an explicit, logged approximation). Without it,
            such cells are refused where the result depends on the column; the latent space
            of a model whose encoder does not take the column (``encode_covariates=False``)
            does not depend on it, and needs no mapping (nor the column at all).
        progress_bar
            Show a progress bar over minibatches.
        first_key
            The noise key of the first cell (default 0): a cell's draws are keyed by
            ``first_key`` + its row in ``adata``, so a chunk of a larger AnnData given the row
            of its first cell gets the numbers of its cells in the whole (this is how
            :func:`scvi_onnx.connect` sends an AnnData to a server in bounded requests).

        Returns
        -------
        ``(n_cells, n_latent)`` float32 array, or the tuple ``(mean, var)`` if ``return_dist``.
        """
        seed = self._seed(seed)
        if give_mean and self.module.ln and not return_dist:
            check_positive_int("mc_samples", mc_samples)
        mbs = self._minibatches(
            adata,
            indices,
            batch_size,
            dataloader,
            scoring=False,
            what="the latent space",
            per_cell=True,
            **_read(
                missing_genes, min_gene_overlap, layer, gene_key, unseen_as, progress_bar, first_key
            ),
        )
        return latent_loop.latent(
            self.module,
            self.engine,
            mbs,
            give_mean=give_mean,
            mc_samples=mc_samples,
            return_dist=return_dist,
            seed=seed,
        )

    @dask_dispatch  # an AnnData whose matrix is a Dask array runs on Dask
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
        """Evidence lower bound per cell (or its mean), as scvi-tools' ``get_elbo``.

        ``elbo = -(reconstruction_loss + kl_local)`` with one posterior draw per cell
        (``kl_weight`` is not applied). Higher is better.

        Parameters
        ----------
        adata, indices, batch_size, dataloader
            The cells, as in :meth:`get_latent_representation`.
        return_mean
            Return the mean over cells (default) instead of the per-cell values.
        data_loader_kwargs
            Accepted for scvi-tools' signature; must be empty (scvi-onnx reads the data itself).
        seed
            Seed of the posterior draws (default: the model's ``seed``). A cell's draw
            depends on the seed and its row in ``adata`` only.
        missing_genes, min_gene_overlap, layer, gene_key, unseen_as, progress_bar, first_key
            As in :meth:`get_latent_representation`: here the decoder's covariates (and the
            categories of per-batch / per-label dispersion and library prior) are read too,
            so their unseen categories need ``unseen_as`` (or a fine-tuned query model).

        Returns
        -------
        The mean ELBO (float) if ``return_mean``, else a ``(n_cells,)`` float64 array.
        """
        terms = self._elbo_terms(
            adata,
            indices,
            batch_size,
            dataloader,
            data_loader_kwargs,
            seed,
            "the ELBO",
            _read(
                missing_genes, min_gene_overlap, layer, gene_key, unseen_as, progress_bar, first_key
            ),
        )
        out = terms.elbo()
        return float(out.mean()) if return_mean else out

    @dask_dispatch  # an AnnData whose matrix is a Dask array runs on Dask
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
        """Reconstruction loss for one posterior draw per cell, as scvi-tools'
        ``get_reconstruction_error``.

        The value is a negative log-likelihood, ``-log p(x | z, l)`` for SCVI: lower is better
        (scvi-tools' docstring says otherwise; the numbers are what we match).

        Parameters
        ----------
        adata, indices, batch_size, dataloader
            The cells, as in :meth:`get_latent_representation`.
        return_mean
            Return the mean over cells (default) instead of the per-cell values.
        data_loader_kwargs
            Accepted for scvi-tools' signature; must be empty.
        seed
            Seed of the posterior draws (default: the model's ``seed``).
        missing_genes, min_gene_overlap, layer, gene_key, unseen_as, progress_bar, first_key
            As in :meth:`get_latent_representation`: here the decoder's covariates (and the
            categories of per-batch / per-label dispersion and library prior) are read too,
            so their unseen categories need ``unseen_as`` (or a fine-tuned query model).

        Returns
        -------
        ``{key: value}`` with scvi-tools' keys (``"reconstruction_loss"`` for SCVI,
        LinearSCVI and SCANVI): a float if ``return_mean``, else ``(n_cells,)`` arrays.
        """
        terms = self._elbo_terms(
            adata,
            indices,
            batch_size,
            dataloader,
            data_loader_kwargs,
            seed,
            "the reconstruction error",
            _read(
                missing_genes, min_gene_overlap, layer, gene_key, unseen_as, progress_bar, first_key
            ),
        )
        return {k: float(v.mean()) if return_mean else v for k, v in terms.reconstruction.items()}

    def _elbo_terms(
        self, adata, indices, batch_size, dataloader, data_loader_kwargs, seed, what, data
    ):
        _no_loader_kwargs(data_loader_kwargs)
        seed = self._seed(seed)
        mbs = self._minibatches(
            adata, indices, batch_size, dataloader, scoring=True, what=what, per_cell=True, **data
        )
        return elbo_loop.elbo_terms(self.module, self.engine, mbs, seed)

    @dask_dispatch  # an AnnData whose matrix is a Dask array runs on Dask
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
        """Importance-sampled marginal log-likelihood, as scvi-tools' ``get_marginal_ll``.

        ``log mean_s exp(log p(z_s) + log p(x | z_s, l_s) - log q(z_s | x)
        [+ log p(l_s) - log q(l_s | x)])`` over ``n_mc_samples`` posterior draws (for SCVI;
        each model's terms are documented in its module).

        Parameters
        ----------
        adata, indices, batch_size, dataloader
            The cells, as in :meth:`get_latent_representation`. ``batch_size`` also groups
            the cells of ``return_mean``'s reduction, as in scvi-tools.
        n_mc_samples
            Importance samples per cell.
        return_mean
            Return scvi-tools' mean (see Returns) instead of the per-cell values.
        data_loader_kwargs
            Accepted for scvi-tools' signature; must be empty.
        n_mc_samples_per_pass
            Samples per decoder call (memory knob; default: as many as fit one call). Results
            do not depend on it.
        seed
            Seed of the posterior draws (default: the model's ``seed``).
        missing_genes, min_gene_overlap, layer, gene_key, unseen_as, progress_bar, first_key
            As in :meth:`get_latent_representation`: here the decoder's covariates (and the
            categories of per-batch / per-label dispersion and library prior) are read too,
            so their unseen categories need ``unseen_as`` (or a fine-tuned query model).

        Returns
        -------
        With ``return_mean``, the mean over minibatches of the per-minibatch means (exactly
        scvi-tools' reduction; minibatches of ``batch_size`` cells, default 128); else a
        ``(n_cells,)`` float64 array.
        """
        _no_loader_kwargs(data_loader_kwargs)
        seed = self._seed(seed)
        n_mc_samples = check_positive_int("n_mc_samples", n_mc_samples)
        per_pass = check_positive_int(
            "n_mc_samples_per_pass", n_mc_samples_per_pass, allow_none=True
        )
        mbs = self._minibatches(
            adata,
            indices,
            batch_size,
            dataloader,
            scoring=True,
            what="the marginal log-likelihood",
            **_read(
                missing_genes, min_gene_overlap, layer, gene_key, unseen_as, progress_bar, first_key
            ),
        )
        per_minibatch = list(
            mll_loop.marginal_ll(self.module, self.engine, mbs, n_mc_samples, per_pass, seed)
        )
        if return_mean:
            return mll_loop.mean_of_minibatch_means(per_minibatch)
        return np.concatenate(per_minibatch)


def load(
    path: str | Path,
    adata: Any = None,
    device: str = "auto",
    seed: int = 0,
    *,
    verify_checksums: bool = True,
    intra_op_threads: int | None = None,
    n_threads: int | None = None,
    scoring: str = "auto",
    input_layer: str = "auto",
    expected_digest: str | None = None,
) -> OnnxVAEModel:
    """Load a scvi-onnx bundle as the runtime class of its model.

    :class:`~scvi_onnx.OnnxSCVI` for SCVI, :class:`~scvi_onnx.OnnxLinearSCVI` (adds
    ``get_loadings``) for LinearSCVI, :class:`~scvi_onnx.OnnxSCANVI` (adds ``predict``) for
    SCANVI, :class:`~scvi_onnx.OnnxTOTALVI` for TOTALVI.

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
    verify_checksums
        Check every bundle file's sha256 first (default True).
    intra_op_threads
        ONNX Runtime threads per session (default 1, bit-identical for any batch size).
    n_threads
        Worker threads over minibatches and sample chunks (default: the CPU count, at most
        8); results do not depend on it.
    scoring
        Where ``log p(x | z)`` is summed over genes: ``"auto"`` (the bundle's scoring graph on
        CUDA, numpy on the CPU), ``"host"`` or ``"graph"``.
    input_layer
        How a PEAKVI's encoders multiply the regions: ``"auto"`` (from the non-zero entries,
        on the CPU, where the bundle has the sparse encoders (PEAKVI on 10,000 regions or
        more) and its training data was at most 5% non-zero; else the dense minibatch),
        ``"sparse"`` or ``"dense"``. The two differ by float32 rounding. Other models have
        one way.
    expected_digest
        The bundle's pinned digest (``sha256:...``, as ``scvi-onnx info`` shows it): any
        other bundle is refused, as container images are pinned by digest. The checksums
        inside a bundle prove it is whole, not that it is the one that was validated.

    Raises
    ------
    BundleError
        The folder is not a readable scvi-onnx bundle (missing, tampered, too new).
    BundleIntegrityError
        A file is altered, or the digest is not ``expected_digest``.
    ProviderError
        ``device="cuda"`` cannot be honoured.
    """
    from ..bundle import read_manifest

    model_class = read_manifest(
        path, check_files=False, expected_digest=expected_digest
    ).model_class
    cls = entry(model_class).load("api")
    return cls(
        path,
        adata,
        device=device,
        seed=seed,
        verify_checksums=verify_checksums,
        intra_op_threads=intra_op_threads,
        n_threads=n_threads,
        scoring=scoring,
        input_layer=input_layer,
        expected_digest=expected_digest,
    )
