"""What a model module gives the four methods: the interface every scvi-tools module implements.

scvi-tools separates the *module* (the torch maths of one minibatch: ``VAE``, ``LDVAE``,
``SCANVAE``, ...) from the *model* (the public class and its loops). So does scvi-onnx: a
:class:`Module` computes one minibatch's terms over its ONNX graphs and numpy; the loops
(:mod:`scvi_onnx.methods`: tasks, threads, Monte-Carlo chunks, reductions) are written once for
every module; the public classes (:mod:`scvi_onnx.api`) hold the signatures and checks.

A module gives:

- :meth:`Module.encode`: the posterior ``q(z | x)`` of a minibatch (``qz_m``, ``qz_v``, and
  whatever else its encoder outputs);
- :meth:`Module.z_draws`: posterior draws of z (transformed for a logistic-normal latent);
- :meth:`Module.prepare`: the per-group scoring state (counts, count terms, device buffers);
- :meth:`Module.elbo_terms`: one draw's reconstruction losses (by scvi-tools' keys) and KL;
- :meth:`Module.log_weights`: importance log-weights of ``get_marginal_ll``, for a chunk of
  draws ``start .. start + n``.

Every draw is a pure function of (seed, stream, cell key, draw index) (:mod:`~scvi_onnx.maths.rng`),
so any split of cells or draws gives the same numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..bundle import Manifest, NpzArrays, Registry
from ..bundle import format as F
from ..data import DataNeeds, Minibatch
from ..data.text import cells_phrase, preview
from ..errors import BundleIntegrityError, DegeneratePosteriorError, InvalidArgumentError
from ..maths import distributions as D
from ..maths import rng
from ..sessions import Graph

_FIRST = ("encoder", "decoder")


def covariates_taken(graph_inputs: Mapping[str, Sequence[str]], scoring: bool) -> dict[str, str]:
    """The registered covariates the encoder (and, when ``scoring``, the decoder and every other
    graph) takes, from each graph's input names: the part of :meth:`Module.obs_usage` every
    module shares."""
    used: dict[str, str] = {}
    graphs = [("encoder", "the encoder takes it")]
    if scoring:
        graphs.append(("decoder", "the decoder takes it"))
        graphs += [(g, f"the {g} graph takes it") for g in graph_inputs if g not in _FIRST]
    covariates = ((F.IN_BATCH, "batch"), (F.IN_CAT, "cat_covs"), (F.IN_CONT, "cont_covs"))
    for graph, why in graphs:
        for name, kind in covariates:
            if name in graph_inputs.get(graph, ()):
                used.setdefault(kind, why)
    return used


def check_array_shapes(arrays: Mapping[str, np.ndarray], want: Mapping[str, tuple]) -> None:
    """Each of ``want``'s arrays present with its shape (fail at load, not mid-call): a missing
    array or another shape is a :class:`BundleIntegrityError`."""
    for name, shape in want.items():
        arr = arrays[name]  # a missing array is a BundleIntegrityError
        if arr.shape != shape:
            raise BundleIntegrityError(
                f"{F.ARRAYS_FILE}: {name} has shape {arr.shape}, expected {shape} for this "
                "model; re-export the bundle"
            )


def library_description(config: Mapping[str, Any], registry: Registry) -> str:
    """How a VAE-family model (SCVI, TOTALVI) gets each cell's library size, for ``info``."""
    if config.get("use_size_factor_key"):
        return f"size factors from obs[{registry.size_factor_key!r}]"
    if config.get("use_observed_lib_size", True):
        return "observed (log total counts of each cell)"
    return "learned (per-batch log-normal prior)"


def check_posterior(enc: Mapping[str, np.ndarray], mb: Minibatch) -> None:
    """Refuse cells whose posterior variance (``qz_v``, and ``ql_v`` where the library is
    learned) is zero or not finite, with a :class:`DegeneratePosteriorError` naming them.

    An encoder without a variance floor (PEAKVAE's, ``var_eps=0``) can underflow to exactly
    0 in float32: the KL term is then infinite and the importance weights undefined. scvi-tools
    refuses such cells in all four methods (``torch.distributions.Normal`` rejects a zero
    scale); :meth:`get_latent_representation` gives their posterior, which is well defined.
    """
    for key in (F.OUT_QZ_V, F.OUT_QL_V):
        v = enc.get(key)
        if v is None:
            continue
        ok = (v > 0) & np.isfinite(v)  # NaN fails both
        if ok.all():
            continue
        bad = np.flatnonzero(~ok.all(axis=1))
        zero = bool((v[bad] == 0).any())
        what = "exactly 0 (float32 underflow)" if zero else "not a positive finite number"
        raise DegeneratePosteriorError(
            f"the encoder's posterior variance ({key}) is {what} in "
            f"{cells_phrase(bad.size)}, e.g. {preview(mb.cell_names(bad))}; "
            f"{'its' if bad.size == 1 else 'their'} KL term is infinite and the "
            "importance-sampling marginal LL undefined, so the scoring methods refuse them, as "
            "scvi-tools does (torch's Normal rejects a zero scale); get_latent_representation "
            "gives their posterior. Drop them to score the other cells"
        )


@dataclass(frozen=True)
class ElboTerms:
    """One posterior draw's per-cell terms of a module's loss, as ``get_elbo`` sums them.

    ``reconstruction``: scvi-tools' ``reconstruction_loss`` entries by their keys (what
    ``get_reconstruction_error`` returns); ``kl``: the sum of its ``kl_local`` entries.
    """

    reconstruction: dict[str, np.ndarray]
    kl: np.ndarray

    def elbo(self) -> np.ndarray:
        rec = None
        for value in self.reconstruction.values():
            rec = value if rec is None else rec + value
        return -(rec + self.kl)


@dataclass(frozen=True)
class BundleContents:
    """What a module is built from: the bundle's manifest, its typed config, its arrays."""

    path: Path
    manifest: Manifest
    config: Any
    arrays: NpzArrays

    def graph(
        self, name: str, device: str, intra_op_threads: int | None, *, like: Graph | None = None
    ) -> Graph:
        """Graph ``name`` in a session on ``device``; with ``like`` (a graph of the bundle
        already open, whose provider it takes), opened on its first run instead: a call that
        needs only the encoder (the latent space) never reads the decoder's weights (126 MB
        per graph for a 100,000-region PEAKVI)."""
        path = self.path / self.manifest.graph_file(name)
        if like is None:
            return Graph(path, device, intra_op_threads=intra_op_threads)
        device = "cuda" if like.on_cuda else "cpu"
        return Graph(path, device, intra_op_threads=intra_op_threads, lazy=True)


#: ``input_layer=`` choices: how a PEAKVI's encoders multiply the regions.
INPUT_LAYERS = ("auto", "sparse", "dense")
#: ``input_layer="auto"`` uses a bundle's sparse encoders on the CPU when its training data
#: had at most this share of non-zero values. The product from the non-zero entries against
#: ONNX Runtime's dense one, whole methods, 2 threads, 2,000 cells of the 100,000-region
#: benchmark model with random accessible regions added: latent 1.45x / 1.2x / 0.9x / 0.8x
#: and ELBO 1.3x / 1.15x / 1.0x / 0.8x as fast at 3.6% / 5.9% / 7.8% / 9.8% non-zero; the
#: 15,792-region model on its 8.4%: 0.74x / 0.84x. The kernels alone (one thread, 64 cells
#: a call) cross near 9-10% at any width from 15,792 to 100,000 regions.
SPARSE_MAX_DENSITY = 0.05


def sparse_wanted(contents: BundleContents, input_layer: str) -> bool:
    """Whether to open the bundle's sparse encoders: ``"auto"`` where it has them and its
    training data was sparse enough (:data:`SPARSE_MAX_DENSITY`; the caller keeps the dense
    ones on CUDA), ``"sparse"`` always (an error if it has none), ``"dense"`` never."""
    if input_layer not in INPUT_LAYERS:
        raise InvalidArgumentError(
            f"input_layer must be one of {INPUT_LAYERS}, got {input_layer!r}"
        )
    found = sparse_encoders(contents.manifest)
    if input_layer == "sparse" and found is None:
        raise InvalidArgumentError(
            "input_layer='sparse' but this bundle has no sparse encoders (a PEAKVI exported "
            "with fewer than 10,000 regions, another model, or an export by an earlier "
            "scvi-onnx); use input_layer='auto' or 'dense'"
        )
    if found is None or input_layer == "dense":
        return False
    return input_layer == "sparse" or found["cpu_default"]


def sparse_encoders(manifest: Manifest) -> dict[str, Any] | None:
    """``None`` for a bundle without sparse encoders; else the training data's share of
    non-zero values the export recorded (``density``, ``None`` when it had no data) and
    whether ``input_layer="auto"`` takes them on the CPU (``cpu_default``)."""
    entry = manifest.graphs.get("encoder_sparse")
    if entry is None:
        return None
    layer = entry.get(F.INPUT_LAYER) if isinstance(entry, dict) else None
    density = layer.get("density") if isinstance(layer, dict) else None
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        density = None
    return {
        "density": density,
        "cpu_default": density is not None and density <= SPARSE_MAX_DENSITY,
    }


class Module(ABC):
    """The per-minibatch maths of one scvi-tools module (see the module docstring)."""

    #: The typed config this module reads from the manifest (a frozen dataclass).
    Config: ClassVar[type]
    #: ``get_reconstruction_error``'s keys, in scvi-tools' order.
    reconstruction_keys: ClassVar[tuple[str, ...]] = ("reconstruction_loss",)
    #: Config entries the public class's ``repr`` shows.
    repr_config: ClassVar[tuple[str, ...]] = ("latent_distribution",)

    config: Any
    #: The execution provider that runs the graphs.
    provider: str
    #: What the scoring methods need of each minibatch.
    needs: DataNeeds
    #: Fewest cells of one call in the latent space (and the other encoder-only methods),
    #: where the module needs more than the engine's ``MIN_CALL_ROWS``; ``None``: that.
    latent_call_rows: int | None = None
    #: The same for one task of the per-cell scoring methods (ELBO, reconstruction error):
    #: cells whose encoders run in one call (the module bounds its decoder calls itself);
    #: ``None``: the engine's task size.
    score_task_rows: int | None = None

    @classmethod
    def describe(cls, config: Mapping[str, Any], registry: Registry) -> dict[str, str]:
        """What a bundle's config means, for ``scvi-onnx info``: label -> text, in order.

        Read from the manifest's config as written and its registry (no bundle is loaded).
        ``"architecture"`` goes on the model line; the other entries get a line each.
        """
        return {"latent distribution": str(config.get("latent_distribution"))}

    @property
    @abstractmethod
    def n_latent(self) -> int: ...

    @property
    @abstractmethod
    def n_features(self) -> int:
        """Input columns per cell (the size of a cell's work in the decoder)."""

    @property
    def ln(self) -> bool:
        """Whether z is logistic-normal (``softmax`` of a Gaussian draw)."""
        return self.config.latent_distribution == "ln"

    @abstractmethod
    def obs_use(self, scoring: bool) -> dict[str, str]:
        """Which registered obs inputs (``batch``, ``labels``, ``cat_covs``, ``cont_covs``,
        ``size_factor``) the latent space (``scoring=False``) or the scoring methods read, and
        why (for refusals): the others change no number, so their columns may be absent or
        hold categories never seen in training."""

    @staticmethod
    @abstractmethod
    def obs_usage(
        config: Any, graph_inputs: Mapping[str, Sequence[str]], scoring: bool
    ) -> dict[str, str]:
        """:meth:`obs_use` from a config and each graph's input names (as the manifest lists
        them), without sessions: what ``scvi-onnx info`` shows."""

    @staticmethod
    def feeds(mb: Minibatch) -> dict[str, Any]:
        """The minibatch's covariate inputs, by graph input name (each graph takes the ones
        among its inputs: :meth:`~scvi_onnx.sessions.Graph.run`)."""
        return {
            F.IN_BATCH: mb.batch,
            F.IN_CAT: mb.cat_covs,
            F.IN_CONT: mb.cont_covs,
            F.IN_LABELS: mb.labels,
        }

    @abstractmethod
    def encode(self, mb: Minibatch) -> dict[str, np.ndarray]:
        """The encoder's outputs for a minibatch: at least ``qz_m`` and ``qz_v``."""

    def encode_scored(self, mb: Minibatch, *, low_memory: bool = False) -> dict[str, np.ndarray]:
        """:meth:`encode` for the scoring methods (ELBO, reconstruction error, marginal LL),
        refusing cells whose posterior is degenerate: see :func:`check_posterior`.

        ``low_memory``: the caller encodes these cells once and then decodes them for long
        (the marginal LL); a module may then give up speed for memory (PEAKVI's sparse first
        layers are not kept) and add per-cell values that :meth:`prepare` takes from the
        result instead of computing them again."""
        enc = self.encode(mb)
        check_posterior(enc, mb)
        return enc

    def z_draws(
        self, mb: Minibatch, enc: Mapping[str, np.ndarray], seed: int, start: int, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(untransformed, transformed) z of shape (n, cells, L) for draws start..start+n."""
        cells = mb.cells
        L = self.n_latent
        eps = rng.normals(seed, rng.STREAM_Z, cells, n * L, start=start * L)
        eps = eps.reshape(len(cells), n, L).transpose(1, 0, 2)
        m = enc[F.OUT_QZ_M].astype(np.float64)
        s = np.sqrt(enc[F.OUT_QZ_V].astype(np.float64))
        u = m[None] + eps * s[None]
        return u, (D.softmax(u, axis=-1) if self.ln else u)

    @abstractmethod
    def prepare(self, mb: Minibatch, enc: Mapping[str, np.ndarray] | None = None) -> Any:
        """Per-group scoring state, shared by every chunk of draws of these cells; ``enc``:
        their :meth:`encode_scored` result where the caller has it."""

    @abstractmethod
    def elbo_terms(self, mb: Minibatch, seed: int) -> ElboTerms:
        """One posterior draw's terms of the module's loss."""

    @abstractmethod
    def log_weights(
        self,
        mb: Minibatch,
        enc: Mapping[str, np.ndarray],
        state: Any,
        seed: int,
        start: int,
        n: int,
    ) -> np.ndarray:
        """Importance log-weights of draws start..start+n, shape (n, cells) float64."""
