"""Self-check of a bundle on this machine: re-run the stored probes and compare.

The exporter stores probe inputs and scvi-tools' torch outputs for them in ``probes.npz``.
:func:`verify` runs the graphs on this machine's execution provider and reports, per output,
the largest absolute and relative deviation against the stored tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import format as F
from .bundle import load_npz
from .errors import BundleIntegrityError
from .maths.dispersion import cell_dispersion
from .sessions import create_session


@dataclass(frozen=True)
class VerifyRow:
    output: str
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`: ``ok`` only when every output is within tolerance."""

    path: str
    provider: str
    rows: tuple[VerifyRow, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def to_json(self) -> dict:
        return {
            "bundle": self.path,
            "provider": self.provider,
            "ok": self.ok,
            "outputs": [r.__dict__ for r in self.rows],
        }


def deviation(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> VerifyRow:
    """Max abs / rel deviation of ``got`` from ``want``; ok when ``|got - want| <= atol +
    rtol * |want|`` at every finite entry and every non-finite entry is the same in both (the
    same infinity, or NaN in both: a model whose decoder overflows for a cell, as a library
    size learned from raw counts can on the synthetic probe cells, overflows in torch too).
    A float32 ``got`` is compared with ``want`` as float32 holds it (a float64 reference sum
    beyond float32's range is the infinity float32 gives). ``reason`` counts the non-finite
    entries. Used by the exporter's validation and by :func:`verify`."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got64.shape != want64.shape:
        reason = f"shape {got64.shape} != {want64.shape}"
        return VerifyRow(name, float("inf"), float("inf"), atol, rtol, False, reason)
    if np.asarray(got).dtype == np.float32:
        # a float32 output against a float64 reference (a sum of float64 terms): beyond
        # float32's range the reference is what float32 (torch's modules too) can give, +-inf
        with np.errstate(over="ignore"):
            want64 = want64.astype(np.float32).astype(np.float64)
    finite = np.isfinite(got64) & np.isfinite(want64)
    both_nan = np.isnan(got64) & np.isnan(want64)
    same = finite | both_nan | (got64 == want64)  # equal infinities compare equal
    g, w = got64[finite], want64[finite]
    diff = np.abs(g - w)
    rel = diff / np.maximum(np.abs(w), 1e-30)
    ok = bool(same.all() and np.all(diff <= atol + rtol * np.abs(w)))
    n_odd = int((~same).sum())
    n_equal = int((same & ~finite).sum())
    n_far = int((diff > atol + rtol * np.abs(w)).sum())
    reasons = []
    if n_far:
        reasons.append(f"{n_far} of {got64.size} entries beyond atol + rtol * |want|")
    if n_odd:
        reasons.append(f"non-finite values: {n_odd} entries differ")
    elif n_equal:
        reasons.append(f"{n_equal} non-finite entries, equal in both")
    reason = "; ".join(reasons)
    return VerifyRow(
        name,
        float(diff.max(initial=0.0)),
        float(rel.max(initial=0.0)),
        atol,
        rtol,
        ok,
        reason,
    )


#: A first layer's product ``x @ W`` against another float32 computation of it: within this
#: fraction of ``|x| @ |W|``, the sum of its terms' magnitudes (float32 sums in another order
#: differ by a few units of float32 rounding of that sum, not of the result, which
#: cancellation can make small).
PRODUCT_RTOL = 1e-5


def product_deviation(
    name: str, got: np.ndarray, want: np.ndarray, magnitude: np.ndarray
) -> VerifyRow:
    """``got`` against ``want`` within :data:`PRODUCT_RTOL` of ``magnitude`` (``|x| @ |W|``),
    entry by entry; ``max_rel_diff`` is the largest difference in units of ``magnitude``."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got64.shape != want64.shape:
        reason = f"shape {got64.shape} != {want64.shape}"
        return VerifyRow(name, float("inf"), float("inf"), 0.0, PRODUCT_RTOL, False, reason)
    diff = np.abs(got64 - want64)
    rel = diff / np.maximum(np.asarray(magnitude, np.float64), 1e-30)
    finite = bool(np.isfinite(diff).all())
    n_far = int((~(rel <= PRODUCT_RTOL)).sum())
    ok = finite and n_far == 0
    reason = "" if ok else f"{n_far} of {diff.size} entries beyond {PRODUCT_RTOL} x |x| @ |W|"
    return VerifyRow(
        name,
        float(diff.max(initial=0.0)),
        float(rel.max(initial=0.0)),
        0.0,
        PRODUCT_RTOL,
        ok,
        reason,
    )


def verify(
    path: str | Path,
    device: str = "cpu",
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyReport:
    """Re-run the bundle's probe cells here and compare with the exporter's torch outputs.

    Parameters
    ----------
    path
        Bundle folder. Checksums are verified first.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    atol, rtol
        Override the tolerance stored at export (``|onnx - torch| <= atol + rtol * |torch|``),
        for every output. Without them, each output gets the tolerance it passed with at
        export: the export's, or a wider one the export recorded for an output of a model
        with large activations that it accepted within its float32 rounding spread.
        The CUDA provider runs with TF32 disabled, so the stored tolerance applies there too.

    Returns
    -------
    A :class:`VerifyReport`; ``report.ok`` is True only when every output passes.
    """
    from .models.registry import open_bundle

    _, contents = open_bundle(path)
    root, manifest, arrays = contents.path, contents.manifest, contents.arrays
    val = manifest.validation
    # outputs the export accepted within their float32 rounding spread keep their tolerance,
    # unless the caller gives one
    widened = val.get(F.VALIDATION_WIDENED, {}) if atol is None and rtol is None else {}
    atol = float(val.get("atol", F.DEFAULT_ATOL) if atol is None else atol)
    rtol = float(val.get("rtol", F.DEFAULT_RTOL) if rtol is None else rtol)
    probes = load_npz(root / F.PROBES_FILE)

    def check(name: str, got: np.ndarray, want: np.ndarray) -> VerifyRow:
        tol = widened.get(name, {})
        return deviation(
            name, got, want, float(tol.get("atol", atol)), float(tol.get("rtol", rtol))
        )

    rows = []
    provider = None
    for graph in manifest.graph_names:
        fname = manifest.graph_file(graph)
        sess, provider = create_session(root / fname, device)
        names_in = [i.name for i in sess.get_inputs()]
        names_out = [o.name for o in sess.get_outputs()]
        feeds = {n: probes[F.probe_name(graph, "in", n)] for n in names_in}
        try:
            outputs = sess.run(None, feeds)
        except Exception as e:  # onnxruntime's own exception types: probes do not fit
            raise BundleIntegrityError(
                f"the probe inputs in {F.PROBES_FILE} do not fit {fname} "
                f"({type(e).__name__}: {e}); the bundle is inconsistent: re-export it"
            ) from e
        got = dict(zip(names_out, outputs, strict=True))
        for name in names_out:
            key = F.probe_name(graph, "out", name)
            if key in probes:
                rows.append(check(f"{graph}.{name}", got[name], probes[key]))
        theta_key = F.probe_name(graph, "out", F.PROBE_THETA)
        if graph == "decoder" and theta_key in probes:
            theta = cell_dispersion(
                contents.config.dispersion,
                arrays[F.ARR_PX_R] if F.ARR_PX_R in arrays else None,
                got.get(F.OUT_PX_R),
                probes[F.PROBE_BATCH],
                probes[F.PROBE_LABELS],
            )
            want = probes[theta_key]
            rows.append(check("theta", np.broadcast_to(theta, want.shape), want))
        layer = manifest.graphs[graph].get(F.INPUT_LAYER)
        if layer is not None:
            rows.append(_input_layer_row(contents, graph, layer, probes))
    return VerifyReport(str(root), provider or "", tuple(rows))


def _input_layer_row(contents, graph: str, layer: dict, probes) -> VerifyRow:
    """A sparse graph's first layer as the runtime computes it (``x @ W`` from the non-zero
    entries of the full graph's probe input, ``W`` read from the full graph's file) against
    the ``x_w`` probe its outputs were checked with."""
    from .data import Entries
    from .sessions.input_layer import InputLayer

    manifest = contents.manifest
    try:
        full = layer["graph"]
        x = np.ascontiguousarray(probes[F.probe_name(full, "in", F.IN_X)], dtype=np.float32)
        want = probes[F.probe_name(graph, "in", F.IN_X_PRODUCT)]
        w = InputLayer(
            contents.path / manifest.graph_file(full), layer["initializer"], layer["rows"]
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BundleIntegrityError(
            f"the manifest's {graph} entry or its probes do not describe its first layer "
            f"({e!r}); re-export the bundle"
        ) from None
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w.weight).astype(np.float64)
    return product_deviation(
        f"{graph}.{F.IN_X_PRODUCT}", w.product(Entries.from_dense(x)), want, magnitude
    )
