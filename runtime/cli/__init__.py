"""The ``scvi-onnx`` command line: :mod:`~scvi_onnx.cli.parser` (commands and arguments),
:mod:`~scvi_onnx.cli.commands` and :mod:`~scvi_onnx.cli.info` (what they do),
:mod:`~scvi_onnx.cli.io` (reading inputs, writing outputs atomically),
:mod:`~scvi_onnx.cli.main` (the entry point)."""

from .main import main

__all__ = ["main"]
