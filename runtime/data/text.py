"""How error messages name things: a few items of a list, numbers as Python numbers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: How many offending items an error message lists.
SHOW = 5
#: How many missing genes an error message lists.
SHOW_GENES = 10


def preview(items: Sequence[Any] | np.ndarray, n: int = SHOW) -> str:
    """``'a', 'b', 'c' (and 12 more)``: the first ``n`` items of a sequence, repr'd."""
    items = list(items)
    shown = ", ".join(repr(plain(x)) for x in items[:n])
    if len(items) > n:
        shown += f" (and {len(items) - n} more)"
    return shown


def plain(x: Any) -> Any:
    """numpy scalars -> python scalars, so messages read ``3`` rather than ``np.int64(3)``."""
    return x.item() if isinstance(x, np.generic) else x


def have(n: int) -> str:
    return "has" if n == 1 else "have"


def cells_phrase(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"
