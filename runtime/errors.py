"""Typed errors raised by scvi-onnx.

Every error says what was wrong and what to do. All derive from :class:`ScviOnnxError`;
input-validation errors also derive from :class:`ValueError` so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "ScviOnnxError",
    "BundleError",
    "BundleIntegrityError",
    "BundleVersionError",
    "InputDataError",
    "MissingGenesError",
    "UnknownCategoryError",
    "MissingColumnError",
    "InvalidValuesError",
    "ZeroLibrarySizeError",
    "DegeneratePosteriorError",
    "InvalidArgumentError",
    "ProviderError",
    "UnsupportedModelError",
    "ExportValidationError",
    "NonIntegerCountsWarning",
]


class ScviOnnxError(Exception):
    """Base class of every error raised by scvi-onnx."""


class BundleError(ScviOnnxError, ValueError):
    """The bundle folder is missing, unreadable, or not a scvi-onnx bundle."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing, truncated or altered (sha256 mismatch)."""


class BundleVersionError(BundleError):
    """The bundle's schema version is newer than this runtime understands."""


class InputDataError(ScviOnnxError, ValueError):
    """The input data (AnnData, dataloader minibatch) cannot be used with this model."""


class MissingGenesError(InputDataError):
    """Genes of the model are absent from the input data."""


class UnknownCategoryError(InputDataError):
    """A categorical column holds a category the model never saw in training."""


class MissingColumnError(InputDataError):
    """A column registered at training time (batch, labels, covariates, ...) is absent."""


class InvalidValuesError(InputDataError):
    """The input holds NaN, infinite or negative values, or values of the wrong type."""


class ZeroLibrarySizeError(InputDataError):
    """Cells with zero total counts where the model uses the observed library size."""


class DegeneratePosteriorError(InputDataError):
    """Cells whose posterior variance is zero or not finite: their ELBO's KL term is infinite
    and the importance-sampling marginal LL undefined (scvi-tools refuses them too)."""


class InvalidArgumentError(ScviOnnxError, ValueError):
    """A method argument is out of range or of the wrong kind."""


class ProviderError(ScviOnnxError, RuntimeError):
    """The requested ONNX Runtime execution provider cannot be used."""


class UnsupportedModelError(ScviOnnxError, ValueError):
    """The exporter cannot export this model (an option it does not handle)."""


class ExportValidationError(ScviOnnxError, RuntimeError):
    """The exported graphs do not reproduce the torch modules within tolerance."""


class NonIntegerCountsWarning(UserWarning):
    """Non-integer values were given to a count likelihood (accepted, as in scvi-tools)."""
