"""A bundle graph in an ONNX Runtime session: its IO names, feeds and device transfers."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleIntegrityError, ProviderError
from .ops import POSITION_DEPENDENT_OPS, file_op_types, file_signature
from .providers import CPU, CUDA, create_session

logger = logging.getLogger(__name__)

#: Cells axis and samples axis, as the exporter names the graphs' dynamic axes.
CELLS_AXIS, SAMPLES_AXIS = "n_cells", "n_samples"

#: A graph with a position-dependent operator (:data:`~.ops.POSITION_DEPENDENT_OPS`) runs on
#: the CPU with its cells padded so that every tensor holds a multiple of this many elements
#: per ``(sample, cell)`` row count: no element is left to a kernel's scalar tail, so a cell's
#: result does not depend on how many cells share its minibatch. 16 covers SIMD packets of 4
#: (measured here), 8 (AVX) and 16 (AVX-512) floats.
ROW_MULTIPLE = 16


class Graph:
    """One ONNX graph of a bundle, loaded in a session on ``device``.

    ``run`` takes a mapping that may hold more than the graph's inputs (the model's feeds of a
    minibatch) and returns the outputs by name. Sessions are thread-safe; a ``Graph`` holds no
    other state.

    On the CPU, a graph holding an operator whose kernel depends on an element's position in
    its tensor (e.g. ``Softplus``: TOTALVI's background scale, a softplus variance activation)
    is run with its cells padded (the last cell repeated) to a row count that leaves no
    scalar tail (:data:`ROW_MULTIPLE`), and the outputs cut back: a cell's numbers are then
    the same bits whatever the batch size. Other graphs, and CUDA, run as given.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        *,
        intra_op_threads: int | None = None,
        lazy: bool = False,
    ):
        self.path = Path(path)
        self._device, self._threads = device, intra_op_threads
        self._session = None
        self._lock = threading.Lock()
        if lazy:
            # opened on first use; its inputs and outputs from the file meanwhile. The device
            # must be settled ("cpu" or "cuda": the provider another graph of the bundle got)
            if device not in ("cpu", "cuda"):
                raise ValueError("a graph opened on first use needs device 'cpu' or 'cuda'")
            self.provider = CUDA if device == "cuda" else CPU
            try:
                inputs, outputs = file_signature(self.path)
            except (OSError, ValueError) as e:
                raise BundleIntegrityError(
                    f"{self.path.name} is not a valid ONNX graph ({e}); re-export the bundle"
                ) from e
        else:
            self._session, self.provider = create_session(
                self.path, device, intra_op_threads=intra_op_threads
            )
            inputs, outputs = self._session_io()
        self._set_io(inputs, outputs)
        found = self._position_dependent_ops() if self.provider != CUDA else []
        self._pad_axes = self._padding_axes(found)
        if lazy and found and self._pad_axes is None:
            # the file does not name the axes ONNX Runtime would infer (a bundle the exporter
            # did not write): open now and pad by ONNX Runtime's shapes, as an eager graph does
            self._set_io(*self._session_io(self.session))
            self._pad_axes = self._padding_axes(found)

    def _session_io(self, session=None) -> tuple[list, list]:
        session = session or self._session
        return (
            [(i.name, i.shape) for i in session.get_inputs()],
            [(o.name, o.shape) for o in session.get_outputs()],
        )

    def _set_io(self, inputs: list, outputs: list) -> None:
        self._input_shapes = dict(inputs)
        self._output_shapes = [shape for _, shape in outputs]
        self.inputs = tuple(name for name, _ in inputs)
        self.outputs = tuple(name for name, _ in outputs)

    @property
    def session(self):
        """The ONNX Runtime session (created on first use for a graph loaded ``lazy``)."""
        if self._session is None:
            with self._lock:
                if self._session is None:
                    session, provider = create_session(
                        self.path, self._device, intra_op_threads=self._threads
                    )
                    if provider != self.provider:
                        raise ProviderError(
                            f"{self.path.name} opened on {provider}, not {self.provider} as "
                            "the bundle's other graphs; load it with device='cpu'"
                        )
                    self._session = session
        return self._session

    def open(self) -> None:
        """Create the session now (a ``lazy`` graph), if it does not exist yet."""
        self.session  # noqa: B018 (the property creates it)

    @property
    def opened(self) -> bool:
        """Whether the session exists (a ``lazy`` graph opens on its first run)."""
        return self._session is not None

    def _position_dependent_ops(self) -> list[str]:
        """The graph's operators in :data:`~.ops.POSITION_DEPENDENT_OPS`, sorted."""
        try:
            ops = file_op_types(self.path)
        except (OSError, ValueError) as e:  # the session loaded it: an unusual encoding
            logger.warning("cannot list the operators of %s (%s): runs unpadded", self.path, e)
            return []
        return sorted(ops & POSITION_DEPENDENT_OPS)

    def _padding_axes(
        self, found: list[str]
    ) -> tuple[dict[str, int], dict[str, int], tuple[int, ...]] | None:
        """``(input -> cells axis, input -> samples axis, output cells axes)`` when this graph
        runs padded (it holds the position-dependent operators ``found``), else ``None``."""
        if not found:
            return None

        def axis(shape, name):
            return next((k for k, d in enumerate(shape) if d == name), None)

        cells = {k: axis(shape, CELLS_AXIS) for k, shape in self._input_shapes.items()}
        samples = {k: axis(shape, SAMPLES_AXIS) for k, shape in self._input_shapes.items()}
        out = tuple(axis(shape, CELLS_AXIS) for shape in self._output_shapes)
        if None in out or not any(a is not None for a in cells.values()):
            logger.debug("%s has %s but no named cells axis: runs unpadded", self.path, found)
            return None
        logger.debug("%s has %s: runs with cells padded", self.path.name, found)
        return (
            {k: a for k, a in cells.items() if a is not None},
            {k: a for k, a in samples.items() if a is not None},
            out,
        )

    @property
    def pads_cells(self) -> bool:
        """Whether ``run`` pads the cells (see the class docstring)."""
        return self._pad_axes is not None

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    def takes(self, name: str) -> bool:
        """Whether the graph has input ``name``."""
        return name in self.inputs

    def input_shape(self, name: str) -> list:
        """The declared shape of input ``name`` (dynamic axes are names or None)."""
        return self._input_shapes[name]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on the graph's inputs taken from ``feeds``; outputs by name."""
        inputs = {n: feeds[n] for n in self.inputs}
        n, extra = self._padding(inputs)
        if extra:
            for k, a in self._pad_axes[0].items():
                widths = [(0, 0)] * np.ndim(inputs[k])
                widths[a] = (0, extra)
                inputs[k] = np.pad(inputs[k], widths, mode="edge")
        out = self.session.run(None, inputs)
        if extra:
            out = [
                np.ascontiguousarray(o[(slice(None),) * a + (slice(0, n),)])
                for o, a in zip(out, self._pad_axes[2], strict=True)
            ]
        return dict(zip(self.outputs, out, strict=True))

    def _padding(self, inputs: Mapping[str, Any]) -> tuple[int, int]:
        """``(cells, cells to add)`` for a run on ``inputs`` (0 added: run as given)."""
        if self._pad_axes is None:
            return 0, 0
        cells, samples, _ = self._pad_axes
        n = next(np.shape(inputs[k])[a] for k, a in cells.items())
        # rows per cell: the samples axis, where an input has one (the decoder's z). This
        # assumes the operators act on tensors carrying that axis (S x n' rows); true of every
        # graph the exporter writes (their Softplus / Log act on decoder outputs broadcast over
        # the samples: checked per shipped model by tests/runtime/test_graph_rows.py). A graph
        # applying one to a per-cell tensor alone would need n' a multiple of 16 itself.
        s = max((np.shape(inputs[k])[a] for k, a in samples.items()), default=1)
        step = ROW_MULTIPLE // math.gcd(int(s), ROW_MULTIPLE)
        return n, (-n % step if n else 0)

    def to_device(self, array: np.ndarray) -> Any:
        """``array`` as an ``OrtValue`` on the session's device (sent once, bound many times)."""
        from .providers import import_onnxruntime

        ort = import_onnxruntime()

        where = "cuda" if self.on_cuda else "cpu"
        return ort.OrtValue.ortvalue_from_numpy(array, where, 0)

    def run_bound(
        self, bound: Mapping[str, Any], feeds: Mapping[str, Any], output: str
    ) -> np.ndarray:
        """Run with IO binding: ``bound`` inputs already on the device (``OrtValue``), the
        other inputs taken from ``feeds`` (host arrays); returns ``output`` on the host."""
        if self._pad_axes is not None:  # the CPU: binding saves no transfer; run padded
            host = {**feeds, **{k: v.numpy() for k, v in bound.items()}}
            return self.run(host)[output]
        binding = self.session.io_binding()
        for name in self.inputs:
            if name in bound:
                binding.bind_ortvalue_input(name, bound[name])
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        binding.bind_output(output, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
