"""An export spec: how one scvi-tools model class becomes a bundle.

As optimum keeps one ``OnnxConfig`` per architecture, the exporter keeps one
:class:`ExportSpec` per model class: what it refuses, what its manifest config holds (checked
against the runtime's typed config), what goes into ``arrays.npz``, and its graphs with their
IO names, probe inputs and torch references (:class:`GraphExport`). The orchestration
(:mod:`scvi_onnx.exporter.export`) traces, validates and writes whatever a spec gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from scvi_onnx.bundle import Registry
from scvi_onnx.bundle import format as F
from scvi_onnx.errors import UnsupportedModelError
from scvi_onnx.selfcheck import VerifyRow

from .. import inspect
from ..graphs import GraphIO


@dataclass(frozen=True)
class GraphExport:
    """One graph of a bundle: the module to trace, its IO, probe inputs and torch reference."""

    name: str  # the graph's name in the manifest (a key of bundle.format.GRAPH_FILES)
    module: torch.nn.Module
    io: GraphIO
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    #: A sparse graph's input layer: ``(full graph's name, its first-layer weight, rows,
    #: more entries)``; the export finds the weight among the full graph's initializers and
    #: names it in the manifest (``format.INPUT_LAYER``) with the more entries.
    input_layer: tuple[str, torch.Tensor, int, dict] | None = None

    @property
    def file(self) -> str:
        return F.GRAPH_FILES[self.name]

    def probes(self) -> dict[str, np.ndarray]:
        """The probe arrays of this graph, by their ``probes.npz`` names."""
        out = {F.probe_name(self.name, "in", k): v for k, v in self.feeds.items()}
        out |= {F.probe_name(self.name, "out", k): v for k, v in self.reference.items()}
        return out


#: What an export reproduces for a model trained by an older scvi-tools (see ExportSpec).
REPRODUCE = ("trained", "installed")


class ExportSpec:
    """The export of one scvi-tools model class (subclass per class)."""

    #: scvi-tools' model class and its module class.
    model_class: ClassVar[str]
    module_class: ClassVar[str]

    def __init__(self, model: Any, reproduce: str = "trained"):
        self.model = model
        self.module = model.module
        #: "trained": the numbers of the scvi-tools version that trained the weights (where a
        #: later version changed a computation without converting old models); "installed":
        #: those of the installed scvi-tools on the same weights.
        self.reproduce = reproduce
        self.trained_with = inspect.trained_with(model)

    def check(self) -> None:
        """Refuse what the runtime cannot reproduce (:class:`UnsupportedModelError`)."""
        mod = type(self.module).__name__
        if mod != self.module_class:
            raise UnsupportedModelError(f"{self.model_class} with module {mod} is not supported")

    def registry(self) -> Registry:
        return inspect.registry(self.model)

    def genes(self) -> list[str]:
        return inspect.genes(self.model)

    def config(self, registry: Registry) -> dict[str, Any]:
        """The manifest's ``config``: what the runtime reads, and what describes the module."""
        raise NotImplementedError

    def arrays(self, genes: list[str]) -> dict[str, np.ndarray]:
        """What goes into ``arrays.npz``."""
        return {}

    def extra(self, genes: list[str]) -> dict[str, Any]:
        """The manifest's ``extra`` (model-specific metadata)."""
        return {}

    def graphs(
        self, registry: Registry, config: dict, arrays: dict, rng: np.random.Generator
    ) -> tuple[list[GraphExport], dict[str, np.ndarray]]:
        """The graphs to trace (in manifest order) and extra probe arrays."""
        raise NotImplementedError

    def checks(
        self,
        config: dict,
        arrays: dict,
        graphs: list[GraphExport],
        outputs: dict[str, dict[str, np.ndarray]],
        probes: dict[str, np.ndarray],
        atol: float,
        rtol: float,
        spread: Callable[[str], dict[str, tuple[np.ndarray, np.ndarray]]],
    ) -> list[VerifyRow]:
        """Validation beyond each graph's outputs (``outputs``: ONNX Runtime's, by graph;
        ``probes``: the extra probe arrays that :meth:`graphs` returned).

        A check of a quantity derived from a graph's outputs that fails gets the second chance
        a graph output gets (:func:`~scvi_onnx.exporter.precision.within_rounding`), with the
        quantity derived from ``spread(graph name)``: the traced graph's float32 and float64
        outputs (``{}`` when it cannot run in float64). The export records the tolerance a
        row passed with, under the row's name."""
        return []
