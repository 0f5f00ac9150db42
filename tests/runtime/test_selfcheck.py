"""``verify`` (scvi_onnx.selfcheck): the stored probes re-run on this machine; a probe off by a
tenth of a percent fails exactly its output, in the report, the CLI text and its JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

import scvi_onnx
from scvi_onnx import bundle as B
from scvi_onnx.errors import BundleIntegrityError

from ..conftest import SHIPPED_BUNDLE
from .helpers import assert_refused, cli, copy_bundle, raises, reseal


def test_verify_ok_on_shipped_bundle(capsys):
    report = scvi_onnx.verify(SHIPPED_BUNDLE, device="cpu")
    assert report.ok and report.provider == "CPUExecutionProvider"
    names = {r.output for r in report.rows}
    assert {"encoder.qz_m", "encoder.qz_v", "decoder.px_rate", "decoder.px_dropout"} <= names
    assert all(r.ok and r.atol == 1e-4 and r.rtol == 1e-4 for r in report.rows)
    code, out, err = cli(capsys, "verify", SHIPPED_BUNDLE, "--device", "cpu")
    assert code == 0 and err == "" and "OK: all" in out and "FAIL" not in out


@pytest.mark.parametrize(
    ("key", "output"),
    [
        ("enc_out.qz_m", "encoder.qz_m"),
        ("dec_out.px_rate", "decoder.px_rate"),
        ("dec_out.px_dropout", "decoder.px_dropout"),
        ("dec_out.theta", "theta"),
    ],
)
def test_verify_fails_on_probes_off_by_a_tenth_of_a_percent(capsys, tmp_path, key, output):
    bundle = copy_bundle(tmp_path)
    probes = dict(B.load_npz(bundle / B.PROBES_FILE))
    probes[key] = probes[key] * np.float32(1.001)
    with open(bundle / B.PROBES_FILE, "wb") as f:
        np.savez_compressed(f, **probes)
    reseal(bundle, B.PROBES_FILE)

    report = scvi_onnx.verify(bundle, device="cpu")
    assert not report.ok
    failed = [r.output for r in report.rows if not r.ok]
    assert failed == [output]
    row = next(r for r in report.rows if r.output == output)
    # a 1e-3 change, on top of the graph's own deviation from torch (which is large, relative,
    # on values near zero such as dropout logits)
    base = next(
        r for r in scvi_onnx.verify(SHIPPED_BUNDLE, device="cpu").rows if r.output == output
    )
    assert row.max_abs_diff > row.atol and 5e-4 < row.max_rel_diff < 1.5e-3 + base.max_rel_diff

    code, out, err = cli(capsys, "verify", bundle, "--device", "cpu")
    assert code == 1, err
    fail_lines = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert len(fail_lines) == 1 and fail_lines[0].startswith(output), out
    assert "FAIL: 1 of" in out
    code, out, _ = cli(capsys, "verify", bundle, "--device", "cpu", "--json")
    res = json.loads(out)
    assert code == 1 and res["ok"] is False
    assert [o["output"] for o in res["outputs"] if not o["ok"]] == [output]


def test_verify_refuses_probes_that_do_not_fit_the_graph(capsys, tmp_path):
    bundle = copy_bundle(tmp_path)
    probes = dict(B.load_npz(bundle / B.PROBES_FILE))
    key = "enc_in." + B.IN_X_LOG1P
    probes[key] = probes[key][:, :1999]  # one gene short
    with open(bundle / B.PROBES_FILE, "wb") as f:
        np.savez_compressed(f, **probes)
    reseal(bundle, B.PROBES_FILE)
    raises(BundleIntegrityError, lambda: scvi_onnx.verify(bundle), "probes.npz", "encoder.onnx")
    assert_refused(cli(capsys, "verify", bundle, "--device", "cpu"), "probes.npz")


def test_deviation_non_finite_entries():
    """Equal non-finite entries (the same infinity, NaN in both) agree: a decoder that
    overflows for a cell overflows in torch too. Any other non-finite entry fails, and the
    deviations are measured over the finite entries."""
    from scvi_onnx.selfcheck import deviation

    inf, nan = np.inf, np.nan
    want = np.array([1.0, 2.0, inf, -inf, nan])
    row = deviation("x", want + [1e-6, 0, 0, 0, 0], want, 1e-4, 1e-4)
    assert row.ok and row.reason == "3 non-finite entries, equal in both"
    assert row.max_abs_diff == pytest.approx(1e-6) and np.isfinite(row.max_rel_diff)
    odd = ([1.0, 2.0, -inf, -inf, nan], [1.0, 2.0, inf, -inf, 0.0], [inf, 2.0, inf, -inf, nan])
    for got in odd:
        row = deviation("x", np.array(got), want, 1e-4, 1e-4)
        assert not row.ok and row.reason == "non-finite values: 1 entries differ", got
    row = deviation("x", want + [1.0, 0, 0, 0, 0], want, 1e-4, 1e-4)
    assert not row.ok and row.reason == (
        "1 of 5 entries beyond atol + rtol * |want|; 3 non-finite entries, equal in both"
    )
    # a float32 output against a float64 reference beyond float32's range: the same -inf
    f32 = np.array([-np.inf, 5.0], dtype=np.float32)
    assert deviation("x", f32, np.array([-1e39, 5.0]), 1e-4, 1e-4).ok
    assert not deviation("x", f32, np.array([-1e38, 5.0]), 1e-4, 1e-4).ok
    assert not deviation("x", f32.astype(np.float64), np.array([-1e39, 5.0]), 1e-4, 1e-4).ok
    assert deviation("x", np.ones(3), np.ones(3), 0, 0).reason == ""
