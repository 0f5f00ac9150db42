"""What every command shares: the program name, user errors, one-line messages, JSON."""

from __future__ import annotations

import json
import math
import re
from typing import Any

PROG = "scvi-onnx"
EXPORT_HINT = "pip install 'scvi-onnx[export]'"


_N_PREVIEW = 5


class CLIError(Exception):
    """A user error: reported as one ``scvi-onnx: error:`` line, exit status 2."""


# ============================================================================================
# small helpers
# ============================================================================================
def one_line(text: Any) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
        return f"{exc.filename}: {exc.strerror}"
    msg = one_line(exc)
    # The library's messages name Python keywords; say the command-line flags instead.
    for kw, flag in FLAG_NAMES:
        msg = msg.replace(kw, flag)
    return msg or type(exc).__name__


FLAG_NAMES = (
    ('missing_genes="zero"', "--missing-genes zero"),
    ("min_gene_overlap=0", "--min-gene-overlap 0"),
    ("min_gene_overlap", "--min-gene-overlap"),
    ("batch_size", "--batch-size"),
    ("n_mc_samples", "--n-mc-samples"),
)


def preview(items: Any, n: int = _N_PREVIEW) -> str:
    items = [str(x) for x in items]
    head = ", ".join(items[:n])
    return head + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats (not valid JSON) with None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(json_safe(obj), indent=1, allow_nan=False))


def widened_text(validation: dict) -> str:
    """The outputs the export accepted within their float32 rounding spread, for a line of
    text ("" for none)."""
    from ..bundle.format import VALIDATION_WIDENED

    widened = validation.get(VALIDATION_WIDENED) or {}
    return "".join(
        f"; {name} at rtol {t['rtol']:.3g} (float32 rounding of large activations)"
        for name, t in widened.items()
    )
