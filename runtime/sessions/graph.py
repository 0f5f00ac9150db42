"""A bundle graph in an ONNX Runtime session: its IO names, feeds and device transfers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .providers import CUDA, create_session


class Graph:
    """One ONNX graph of a bundle, loaded in a session on ``device``.

    ``run`` takes a mapping that may hold more than the graph's inputs (the model's feeds of a
    minibatch) and returns the outputs by name. Sessions are thread-safe; a ``Graph`` holds no
    other state.
    """

    def __init__(
        self, path: str | Path, device: str = "auto", *, intra_op_threads: int | None = None
    ):
        self.path = Path(path)
        self.session, self.provider = create_session(
            self.path, device, intra_op_threads=intra_op_threads
        )
        self.inputs = tuple(i.name for i in self.session.get_inputs())
        self.outputs = tuple(o.name for o in self.session.get_outputs())

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    def takes(self, name: str) -> bool:
        """Whether the graph has input ``name``."""
        return name in self.inputs

    def input_shape(self, name: str) -> list:
        """The declared shape of input ``name`` (dynamic axes are names or None)."""
        return next(i.shape for i in self.session.get_inputs() if i.name == name)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on the graph's inputs taken from ``feeds``; outputs by name."""
        out = self.session.run(None, {n: feeds[n] for n in self.inputs})
        return dict(zip(self.outputs, out, strict=True))

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
        binding = self.session.io_binding()
        for name in self.inputs:
            if name in bound:
                binding.bind_ortvalue_input(name, bound[name])
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        binding.bind_output(output, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
