"""The sparse input layer: ``x @ W`` from the non-zero entries, ``W`` read in place from an
ONNX file (``scvi_onnx.sessions.input_layer``, ``scvi_onnx.sessions.ops.initializer``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import scvi_onnx
from scvi_onnx.bundle import format as F
from scvi_onnx.data import Entries
from scvi_onnx.errors import BundleIntegrityError, InvalidArgumentError
from scvi_onnx.sessions.input_layer import InputLayer
from scvi_onnx.sessions.ops import FLOAT, initializer

from ..conftest import MODELS, require


def _sparse_rows(rng, n: int, cols: int, density: float) -> np.ndarray:
    x = rng.poisson(1.0, size=(n, cols)).astype(np.float32) + 1
    x[rng.random((n, cols)) > density] = 0
    return x


@pytest.mark.parametrize("graph", ["pbmc_scvi/encoder.onnx", "pbmc_peakvi/decoder.onnx"])
def test_initializer_matches_onnx(graph):
    """Every initializer of a shipped graph: the dims, type and bytes onnx's own reader gives."""
    onnx = require("onnx")
    from onnx import numpy_helper

    path = MODELS / graph
    data = path.read_bytes()
    model = onnx.load(str(path))
    assert model.graph.initializer
    for init in model.graph.initializer:
        loc = initializer(data, init.name)
        want = numpy_helper.to_array(init)
        if loc is None:  # values not in raw_data / float_data (e.g. int64_data)
            assert init.data_type != FLOAT or not init.raw_data
            continue
        dims, dtype, offset, nbytes = loc
        assert dims == list(init.dims) and dtype == init.data_type
        assert data[offset : offset + nbytes] == want.astype(want.dtype.newbyteorder("<")).tobytes()
    assert initializer(data, "no such initializer") is None


def _graph_with(tmp_path, name: str, w: np.ndarray):
    onnx = require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMul", ["x", name], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])],
        [numpy_helper.from_array(w, name)],
    )
    path = tmp_path / f"{len(name)}.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_product_equals_dense_and_each_row_its_own(tmp_path):
    """The product equals numpy's dense one to float32 rounding, and a cell's row is the
    same bits alone, among others, or in another order of calls (batch-size independence).
    Initializers at every byte offset modulo 4 (names of 1-8 characters) read the same."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 7)).astype(np.float32)
    x = _sparse_rows(rng, 50, 300, 0.05)
    entries = Entries.from_dense(x)
    offsets = set()
    first = None
    for k in range(1, 9):
        name = "w" * k
        path = _graph_with(tmp_path, name, w)
        offsets.add(initializer(path.read_bytes(), name)[2] % 4)
        layer = InputLayer(path, name, 300)
        np.testing.assert_array_equal(layer.weight, w)
        got = layer.product(entries)
        assert got.dtype == np.float32 and got.shape == (50, 7) and got.flags.c_contiguous
        np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)
        first = got if first is None else first
        np.testing.assert_array_equal(got, first)
    assert len(offsets) > 1  # aligned and unaligned raw data both read
    for i in (0, 17, 49):
        alone = layer.product(entries.rows(slice(i, i + 1)))
        np.testing.assert_array_equal(alone[0], first[i])
    order = rng.permutation(50)
    np.testing.assert_array_equal(layer.product(entries.take(order)), first[order])
    # fewer rows than the initializer (continuous covariates' rows follow the regions)
    part = InputLayer(path, name, 200)
    np.testing.assert_allclose(
        part.product(Entries.from_dense(x[:, :200])), x[:, :200] @ w[:200], rtol=1e-5, atol=1e-5
    )


def test_missing_or_wrong_initializer(tmp_path):
    w = np.ones((10, 3), np.float32)
    path = _graph_with(tmp_path, "weight", w)
    with pytest.raises(BundleIntegrityError, match="'other' is not in the file"):
        InputLayer(path, "other", 10).weight  # noqa: B018
    with pytest.raises(BundleIntegrityError, match="at least 11 rows"):
        InputLayer(path, "weight", 11).weight  # noqa: B018
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(BundleIntegrityError, match="not a valid ONNX graph"):
        InputLayer(bad, "weight", 10).weight  # noqa: B018


def test_input_layer_choices_on_bundles_without_sparse_encoders():
    """``input_layer`` is checked for every model; ``"sparse"`` needs the sparse encoders."""
    for name in ("pbmc_scvi", "pbmc_peakvi", "pbmc_totalvi"):
        with pytest.raises(InvalidArgumentError, match="no sparse encoders"):
            scvi_onnx.load(MODELS / name, device="cpu", input_layer="sparse")
        with pytest.raises(InvalidArgumentError, match="input_layer must be one of"):
            scvi_onnx.load(MODELS / name, device="cpu", input_layer="csr")
        m = scvi_onnx.load(MODELS / name, device="cpu", input_layer="dense")
        assert getattr(m.module, "sparse", None) is None


def _sparse_bundle(tmp_path):
    """The shipped PEAKVI bundle with sparse encoders exported (tests/exporter makes real
    ones; here the manifest is what is under test)."""
    src = MODELS / "pbmc_peakvi"
    out = tmp_path / "b"
    shutil.copytree(src, out)
    return out


def test_bad_manifest_entry_fails_at_load(tmp_path):
    """A sparse graph entry naming no first layer, or one not in the full graph, is a
    BundleIntegrityError at load (not at the first cell)."""
    onnx = require("onnx")
    from onnx import TensorProto, helper

    out = _sparse_bundle(tmp_path)
    man = json.loads((out / F.MANIFEST_FILE).read_text())
    # a stand-in sparse encoder: x_w (n, 44) -> qz_m, qz_v (enough to open and check)
    h = 44
    nodes = [
        helper.make_node("Identity", ["x_w"], ["qz_m"]),
        helper.make_node("Identity", ["x_w"], ["qz_v"]),
    ]
    g = helper.make_graph(
        nodes,
        "s",
        [helper.make_tensor_value_info("x_w", TensorProto.FLOAT, ["n_cells", h])],
        [
            helper.make_tensor_value_info("qz_m", TensorProto.FLOAT, ["n_cells", h]),
            helper.make_tensor_value_info("qz_v", TensorProto.FLOAT, ["n_cells", h]),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    for name in ("encoder_sparse", "depth_sparse"):
        onnx.save(m, str(out / F.GRAPH_FILES[name]))
    entry = {"graph": "encoder", "initializer": "nope", "rows": 2000}
    for name in ("encoder_sparse", "depth_sparse"):
        man["graphs"][name] = {
            "file": F.GRAPH_FILES[name],
            "inputs": ["x_w"],
            "outputs": ["qz_m", "qz_v"],
            F.INPUT_LAYER: entry,
        }
    (out / F.MANIFEST_FILE).write_text(json.dumps(man))
    sparse = {"device": "cpu", "verify_checksums": False, "input_layer": "sparse"}
    with pytest.raises(BundleIntegrityError, match="'nope' is not in the file"):
        scvi_onnx.load(out, **sparse)
    entry["rows"] = 1999
    (out / F.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(BundleIntegrityError, match="does not name its first layer"):
        scvi_onnx.load(out, **sparse)
    # the dense encoders are still there: "dense" loads, and "auto" (no density recorded)
    for choice in ("dense", "auto"):
        m = scvi_onnx.load(out, device="cpu", verify_checksums=False, input_layer=choice)
        assert m.module.sparse is None


@pytest.mark.parametrize(
    ("layer", "want"),
    [
        ({"density": 0.036}, True),
        ({"density": 0.05}, True),
        ({"density": 0.0501}, False),
        ({"density": "0.01"}, False),  # not a number: as if unrecorded
        ({}, False),  # exported without its training data
    ],
)
def test_auto_uses_the_sparse_encoders_for_sparse_training_data(layer, want):
    from types import SimpleNamespace

    from scvi_onnx.models.base import sparse_wanted

    entry = {"file": "encoder_sparse.onnx", F.INPUT_LAYER: {"graph": "encoder", **layer}}
    contents = SimpleNamespace(manifest=SimpleNamespace(graphs={"encoder_sparse": entry}))
    assert sparse_wanted(contents, "auto") is want
    assert sparse_wanted(contents, "sparse") is True
    assert sparse_wanted(contents, "dense") is False


def test_reading_w_in_blocks_gives_the_held_products_bits(tmp_path, monkeypatch):
    """``hold=False`` reads ``W`` from the file block by block (here 64 regions a block, one
    block without any non-zero entry) and never keeps it; its products are the held ``W``'s
    bit for bit. Where scipy lacks its private kernel, the same sums in another order."""
    import scvi_onnx.sessions.input_layer as il

    rng = np.random.default_rng(1)
    w = rng.standard_normal((300, 7)).astype(np.float32)
    x = _sparse_rows(rng, 40, 300, 0.05)
    x[:, 64:128] = 0  # a block with no entry
    path = _graph_with(tmp_path, "weight", w)
    held = InputLayer(path, "weight", 300).product(Entries.from_dense(x))
    monkeypatch.setattr(il, "PRODUCT_BLOCK_ROWS", 64)
    layer = InputLayer(path, "weight", 300)
    streamed = layer.product(Entries.from_dense(x), hold=False)
    assert not layer.resident
    np.testing.assert_array_equal(streamed, held)
    assert streamed.dtype == np.float32 and streamed.flags.c_contiguous
    np.testing.assert_array_equal(layer.product(Entries.from_dense(x[:0]), hold=False), held[:0])
    layer.weight  # noqa: B018  (held now: used as it is)
    np.testing.assert_array_equal(layer.product(Entries.from_dense(x), hold=False), held)
    monkeypatch.setattr(il, "_csc_matvecs", lambda: None)
    other = InputLayer(path, "weight", 300).product(Entries.from_dense(x), hold=False)
    np.testing.assert_allclose(other, held, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other, x @ w, rtol=1e-5, atol=1e-5)
