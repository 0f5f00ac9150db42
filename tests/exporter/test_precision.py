"""The export's validation accepts an output past its tolerance only by float32 rounding, and
nothing else: a graph computed in float32 with a known rounding error (catastrophic
cancellation, ``(x + c) - c``) against its exact value, in ONNX Runtime."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from ..conftest import require

torch = require("torch")
require("onnx")

import scvi_onnx  # noqa: E402
from scvi_onnx import bundle as B  # noqa: E402
from scvi_onnx.bundle import format as F  # noqa: E402
from scvi_onnx.errors import ExportValidationError  # noqa: E402
from scvi_onnx.exporter.export import _validate  # noqa: E402
from scvi_onnx.exporter.graphs import GraphIO  # noqa: E402
from scvi_onnx.exporter.precision import (  # noqa: E402
    MAX_WIDENED,
    SPREAD_FACTOR,
    float32_spread,
    tolerance_scale,
    within_rounding,
)
from scvi_onnx.exporter.specs.base import ExportSpec, GraphExport  # noqa: E402
from scvi_onnx.exporter.trace import trace  # noqa: E402
from scvi_onnx.selfcheck import deviation  # noqa: E402


class Shifted(torch.nn.Module):
    """``(x + c) - c``: x exactly in float64, x to float32's spacing at ``c`` in float32."""

    def __init__(self, c: float):
        super().__init__()
        self.register_buffer("c", torch.tensor(c))

    def forward(self, x):
        return (x + self.c) - self.c


class NoChecks(ExportSpec):
    def __init__(self):  # no model: only checks() is used
        pass

    def checks(self, *args):
        return []


X = np.random.default_rng(0).uniform(0.0, 1.0, (64, 8)).astype(np.float32)
IO = GraphIO((F.IN_X,), (F.OUT_QZ_M,))


def validate(tmp_path, c: float, reference: np.ndarray, atol=1e-4, rtol=1e-4):
    g = GraphExport("encoder", Shifted(c), IO, {F.IN_X: X}, {F.OUT_QZ_M: reference})
    trace(g.module, g.io, g.feeds, tmp_path / g.file, dynamic={})
    return _validate(NoChecks(), tmp_path, {}, {}, [g], {}, atol, rtol)


def test_tolerance_scale_closed_form():
    exact = np.array([0.0, 1.0, 10.0, np.inf])
    off = exact * (1 + 1e-4) + np.array([2e-4, 0.0, 0.0, 0.0])
    # worst entry in the tolerance's units: |d| / (atol + rtol |x|), x SPREAD_FACTOR
    want = SPREAD_FACTOR * max(2e-4 / 1e-4, 1e-4 / 2e-4, 1e-3 / 11e-4)
    assert tolerance_scale(off, exact, 1e-4, 1e-4) == pytest.approx(want)
    assert tolerance_scale(exact, exact, 1e-4, 1e-4) == 1.0  # never narrower
    # an entry that must be exact (atol 0 at a zero) and moved: no finite widening
    assert tolerance_scale(np.array([1e-9]), np.array([0.0]), 0.0, 1e-4) == np.inf


def test_float32_spread_runs_the_graph_in_both_precisions():
    g = GraphExport("encoder", Shifted(1e4), IO, {F.IN_X: X}, {})
    out32, out64 = float32_spread(g)[F.OUT_QZ_M]
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    np.testing.assert_allclose(out64, X, rtol=0, atol=1e-12)  # exact in float64
    spacing = np.spacing(np.float32(1e4))
    err = np.abs(out32 - X)
    assert 0.1 * spacing < err.max() <= spacing / 2
    assert g.module.c.dtype == torch.float32  # the traced module is left as it was


def test_rounding_is_accepted_and_recorded(tmp_path):
    """Past rtol 1e-4 (float32 holds 1e4 + x to ~5e-4) and within SPREAD_FACTOR x the
    graph's own float32 spread: accepted, with a warning and the tolerance it passed with."""
    with pytest.warns(UserWarning, match="accepted within float32 rounding: encoder.qz_m"):
        reports, widened = validate(tmp_path, 1e4, X)
    (row,) = reports
    assert row["ok"] and row["max_abs_diff"] > 2e-4
    assert set(widened) == {"encoder.qz_m"}
    assert 1e-4 < widened["encoder.qz_m"]["rtol"] == row["rtol"] <= MAX_WIDENED
    assert "float32 rounding spread" in row["reason"]


def test_a_defect_is_refused_however_large_the_activations(tmp_path):
    """The same graph against a reference 1% off: past the widened tolerance, refused."""
    with pytest.raises(ExportValidationError, match="encoder.qz_m"):
        validate(tmp_path, 1e4, X * np.float32(1.01))


def test_too_much_rounding_is_refused(tmp_path):
    """Float32 holds 1e6 + x to ~0.03: no tolerance under MAX_WIDENED tells it from a defect."""
    with pytest.raises(ExportValidationError, match="too much to tell from a defect"):
        validate(tmp_path, 1e6, X)


def test_well_conditioned_outputs_are_not_widened(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reports, widened = validate(tmp_path, 0.0, X)
    assert widened == {} and reports[0]["ok"] and reports[0]["rtol"] == 1e-4


def shipped_with_widened(tmp_path, widened: dict):
    """A copy of the shipped bundle whose manifest records ``widened``; (path, manifest)."""
    import shutil

    from ..conftest import SHIPPED_BUNDLE

    path = tmp_path / "b"
    shutil.copytree(SHIPPED_BUNDLE, path)
    man = json.loads((path / B.MANIFEST_FILE).read_text())
    man["validation"][F.VALIDATION_WIDENED] = widened
    (path / B.MANIFEST_FILE).write_text(json.dumps(man))
    return path, man


def test_verify_applies_the_recorded_tolerance(tmp_path, capsys):
    """verify gives an output the tolerance the export recorded for it; an explicit atol /
    rtol applies to every output instead; info shows it."""
    from ..runtime.helpers import cli

    path, man = shipped_with_widened(tmp_path, {"decoder.px_rate": {"atol": 0.0, "rtol": 0.0}})
    rows = {r.output: r for r in scvi_onnx.verify(path).rows}
    assert (rows["decoder.px_rate"].atol, rows["decoder.px_rate"].rtol) == (0.0, 0.0)
    assert not rows["decoder.px_rate"].ok  # exact equality with torch is not float32's
    others = [r for name, r in rows.items() if name != "decoder.px_rate"]
    assert others and all(r.rtol == man["validation"]["rtol"] for r in others)
    report = scvi_onnx.verify(path, atol=1e-4, rtol=1e-4)
    assert report.ok and all(r.rtol == 1e-4 for r in report.rows)
    code, out, _ = cli(capsys, "info", path)
    assert code == 0 and "decoder.px_rate at rtol 0 (float32 rounding" in out
    code, out, _ = cli(capsys, "info", path, "--json")
    assert json.loads(out)["validation"]["widened"] == {"decoder.px_rate": {"atol": 0, "rtol": 0}}


# ---------------------------------------------------------------- derived checks (specs)
class Derived(ExportSpec):
    """A spec check of ``exp(2 x)`` derived from the graph's output, with the second chance
    from the derived spread, as the real specs give it."""

    def __init__(self, factor: float = 1.0):
        self.factor = factor

    def checks(self, config, arrays, graphs, outputs, probes, atol, rtol, spread):
        def derive(v):
            return np.exp(2.0 * np.asarray(v, np.float64))

        got = derive(outputs["encoder"][F.OUT_QZ_M])
        want = derive(X) * self.factor
        row = deviation("derived", got, want, atol, rtol)
        if not row.ok:
            row = within_rounding(row, got, want, tuple(map(derive, spread("encoder")[F.OUT_QZ_M])))
        return [row]


def validate_derived(tmp_path, c: float, factor: float):
    g = GraphExport("encoder", Shifted(c), IO, {F.IN_X: X}, {F.OUT_QZ_M: X})
    trace(g.module, g.io, g.feeds, tmp_path / g.file, dynamic={})
    return _validate(Derived(factor), tmp_path, {}, {}, [g], {}, 1e-4, 1e-4)


def test_a_derived_check_gets_the_second_chance_and_is_recorded(tmp_path):
    """exp(2 x) of a graph output rounded at 1e4 + x: past rtol 1e-4, within the spread of
    exp(2 x) over the traced graph's float32 and float64 outputs; recorded as the graph's."""
    with pytest.warns(UserWarning, match="accepted within float32 rounding"):
        reports, widened = validate_derived(tmp_path, 1e4, 1.0)
    rows = {r["output"]: r for r in reports}
    assert rows["derived"]["ok"] and rows["derived"]["max_rel_diff"] > 1e-4
    assert set(widened) == {"encoder.qz_m", "derived"}
    assert 1e-4 < widened["derived"]["rtol"] == rows["derived"]["rtol"] <= MAX_WIDENED


def test_a_derived_defect_is_refused(tmp_path):
    with pytest.raises(ExportValidationError, match="derived"):
        validate_derived(tmp_path, 1e4, 1.01)


def _spread_of(graph: str, output: str, pair):
    return lambda name: {output: pair} if name == graph else {}


def test_gene_cell_theta_is_judged_by_the_spread_of_exp_px_r():
    """SCVISpec's theta check (gene-cell dispersion: exp of the decoder's px_r): ONNX's px_r
    2e-4 off torch's, where the traced decoder's own float32 px_r is 3e-4 off its float64, is
    within 4x the spread of exp(px_r), relative in theta; a px_r 1e-2 off is refused."""
    from scvi_onnx.exporter.specs.vae import SCVISpec

    rng = np.random.default_rng(0)
    px_r64 = rng.uniform(0.0, 6.0, (3, 16, 20))
    px_r32 = (px_r64 + 3e-4 * rng.choice([-1, 1], px_r64.shape)).astype(np.float32)
    want = np.exp(px_r64).astype(np.float32)
    ref = {F.PROBE_THETA: want}
    graphs = [GraphExport("decoder", torch.nn.Identity(), IO, {}, ref)]
    config = {"dispersion": "gene-cell"}
    probes = {F.PROBE_BATCH: np.zeros((16, 1)), F.PROBE_LABELS: np.zeros((16, 1))}
    spread = _spread_of("decoder", F.OUT_PX_R, (px_r32, px_r64))
    spec = object.__new__(SCVISpec)

    def check(onnx_px_r):
        outputs = {"decoder": {F.OUT_PX_R: onnx_px_r.astype(np.float32)}}
        (row,) = spec.checks(config, {}, graphs, outputs, probes, 1e-4, 1e-4, spread)
        return row

    near = check(px_r64 + 2e-4)
    assert near.ok and near.rtol > 1e-4 and "rounding spread" in near.reason
    assert not check(px_r64 + 1e-2).ok
    # without a spread (a decoder that cannot run in float64) the tolerance stays
    (row,) = spec.checks(
        config,
        {},
        graphs,
        {"decoder": {F.OUT_PX_R: (px_r64 + 2e-4).astype(np.float32)}},
        probes,
        1e-4,
        1e-4,
        lambda name: {},
    )
    assert not row.ok and row.rtol == 1e-4


def test_peakvi_host_log_px_is_judged_by_the_scoring_graphs_spread():
    """PEAKVISpec's host kernel check: its sums compute the scoring graph's output, so the
    scoring graph's float32 spread is theirs. A decoder px ~1e-4 relative off torch's (as a
    model with large activations gives) passes within it; one 1% off is refused."""
    from scvi_onnx.exporter.specs.peakvae import PEAKVISpec
    from scvi_onnx.maths import distributions as D

    rng = np.random.default_rng(1)
    S, N, R = 2, 12, 400
    px64 = 1.0 / (1.0 + np.exp(-rng.normal(-1.0, 1.5, (S, N, R))))
    x = (rng.random((N, R)) < 0.3).astype(np.float32)

    def log_px(px):
        return -D.binary_cross_entropy(np.asarray(px, np.float64), x.astype(np.float64)).sum(-1)

    px32 = np.clip(px64 * (1 + 3e-4 * rng.choice([-1, 1], px64.shape)), 0, 1)
    scorer = GraphExport(
        "scorer", torch.nn.Identity(), IO, {F.IN_COUNTS: x}, {F.OUT_LOG_PX: log_px(px64)}
    )
    config = {"model_depth": False}
    spread = _spread_of("scorer", F.OUT_LOG_PX, (log_px(px32).astype(np.float32), log_px(px64)))
    spec = object.__new__(PEAKVISpec)

    def check(px):
        outputs = {"decoder": {F.OUT_PX: px.astype(np.float32)}}
        (row,) = spec.checks(config, {}, [scorer], outputs, {}, 1e-5, 1e-5, spread)
        return row

    near = check(px64 * (1 + 1e-4))
    assert near.ok and near.rtol > 1e-5 and "rounding spread" in near.reason
    assert not check(px64 * 1.01).ok
    assert check(px64).ok  # the kernel on torch's own px: within the plain tolerance


def test_verify_applies_a_recorded_theta_tolerance(tmp_path):
    path, man = shipped_with_widened(tmp_path, {"theta": {"atol": 0.5, "rtol": 0.25}})
    rows = {r.output: r for r in scvi_onnx.verify(path).rows}
    assert (rows["theta"].atol, rows["theta"].rtol) == (0.5, 0.25)
    assert rows["decoder.px_rate"].rtol == man["validation"]["rtol"]
