"""The public classes: one per scvi-tools model class, and :func:`load`."""

from .base import OnnxVAEModel, load

__all__ = ["OnnxVAEModel", "load"]
