"""ONNX Runtime: execution providers checked against what really runs, and bundle graphs."""

from .graph import Graph
from .providers import CPU, CUDA, DEVICES, create_session

__all__ = ["CPU", "CUDA", "DEVICES", "Graph", "create_session"]
