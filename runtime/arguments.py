"""Checks of method arguments, one implementation each: the API and the CLI both call them.

Each raises :class:`~scvi_onnx.errors.InvalidArgumentError` naming the argument, the value and
what is accepted (the CLI turns it into a usage error).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

#: Seeds torch's ``manual_seed`` accepts: [-2**63, 2**64). The draws use the seed modulo 2**64
#: (a negative seed ``s`` is ``s + 2**64``, as in torch: -1 and 2**64 - 1 are one seed); a seed
#: outside that range would repeat the draws of one inside it, so it is refused.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def check_seed(seed: Any) -> int:
    """A seed is an integer in ``[-2**63, 2**64)`` (not a bool, float or string)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgumentError(f"seed must be an integer, got {seed!r}")
    if not SEED_MIN <= int(seed) <= SEED_MAX:
        raise InvalidArgumentError(
            f"seed must be in [-2**63, 2**64 - 1] (as torch.manual_seed), got {seed}: the draws "
            "use it modulo 2**64, so a seed outside that range would repeat the draws of one "
            "inside it"
        )
    return int(seed)


#: The largest ``first_key``: cell keys are int64 row numbers (first_key + row); beyond this
#: the key of a cell of any real input would not fit (numpy's OverflowError, a server's 500).
FIRST_KEY_MAX = (1 << 62) - 1


def check_first_key(value: Any) -> int:
    """A cell key offset: an integer in ``[0, 2**62)`` (not a bool)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not 0 <= int(value) <= FIRST_KEY_MAX
    ):
        raise InvalidArgumentError(
            f"first_key must be an integer in [0, 2**62 - 1] (a cell key), got {value!r}"
        )
    return int(value)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """A positive integer (``None`` too when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_fraction(name: str, value: Any) -> float:
    """A number in ``[0, 1]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) <= 1.0
    ):
        raise InvalidArgumentError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_tolerance(name: str, value: Any) -> float:
    """A finite number >= 0 (a validation tolerance: ``atol``, ``rtol``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) < float("inf")
    ):
        raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """One of ``choices``."""
    if not isinstance(value, str | int | bool | None) or value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {choices!r}, got {value!r}")
    return value


def reject_unknown(method: str, kwargs: Mapping[str, Any], ignored: tuple[str, ...] = ()) -> None:
    """Refuse keyword arguments a method does not take (a typo must not pass silently).

    ``ignored`` names scvi-tools' keyword arguments that are accepted for signature
    compatibility and have no effect here.
    """
    unknown = [k for k in kwargs if k not in ignored]
    if unknown:
        raise InvalidArgumentError(
            f"{method}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"see help({method}) for the arguments it takes"
        )
