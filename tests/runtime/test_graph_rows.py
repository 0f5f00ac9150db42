"""A cell's numbers do not depend on how many cells share its minibatch, also where a graph
holds an operator whose ONNX Runtime CPU kernel computes the last elements of a tensor another
way (Eigen's scalar tail: ``Softplus``, ``Log``, ``Elu``, ...): such graphs run with their cells
padded (``sessions.graph.Graph``). TOTALVI's decoder has one (the background's scale is a
softplus); before, its protein terms moved in the last bits with the batch size."""

from __future__ import annotations

import numpy as np
import pytest

import scvi_onnx
from scvi_onnx.sessions import Graph
from scvi_onnx.sessions.graph import ROW_MULTIPLE
from scvi_onnx.sessions.ops import POSITION_DEPENDENT_OPS, file_op_types, op_types

from ..conftest import MODELS, require

CITE_H5AD = MODELS / "example" / "pbmc_cite.h5ad"
PEAKS_H5AD = MODELS / "example" / "pbmc_peaks.h5ad"

#: operators the exporter's graphs hold or may hold (layers.ACTIVATIONS, the likelihoods)
CANDIDATES = (
    "Exp", "Log", "Sqrt", "Reciprocal", "Sigmoid", "Tanh", "Softplus", "Relu", "LeakyRelu",
    "Elu", "Selu", "Celu", "Gelu", "Mish", "Softmax", "LogSoftmax", "Erf", "HardSigmoid",
    "Softsign", "Abs", "Neg", "Sin", "Cos", "Atan",
)  # fmt: skip


def _unary(onnx, op: str, shape: list) -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model.SerializeToString()


def test_op_types_read_as_onnx_reads_them():
    onnx = require("onnx")
    paths = sorted(MODELS.glob("*/*.onnx"))
    assert len(paths) >= 8
    for p in paths:
        want = {n.op_type for n in onnx.load(p, load_external_data=False).graph.node}
        assert file_op_types(p) == want, p.name
    assert "Softplus" in file_op_types(MODELS / "pbmc_totalvi" / "decoder.onnx")


def test_op_types_of_malformed_bytes_raise_value_error():
    with pytest.raises(ValueError):
        op_types(b"\x0a\xff\xff\xff")  # a field longer than the bytes
    assert op_types(b"") == frozenset()


def test_op_types_of_malformed_files_raise_value_error(tmp_path):
    """The file is memory-mapped: a malformed one still raises ``ValueError`` (the map's
    slices held by the parser's frames must not turn it into a ``BufferError``)."""
    bad, empty = tmp_path / "bad.onnx", tmp_path / "empty.onnx"
    bad.write_bytes(b"\x3a\xff\xff\xff\x0f")
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        file_op_types(bad)
    assert file_op_types(empty) == frozenset()


def test_position_dependent_ops_cover_this_onnxruntime():
    """Each candidate operator alone, on 1-64 rows of 7 against the same rows in a tensor of
    256: those whose results move are in POSITION_DEPENDENT_OPS (an ONNX Runtime upgrade
    that vectorises another kernel this way fails here)."""
    onnx = require("onnx")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    x = np.random.default_rng(0).uniform(0.05, 6.0, (256, 7)).astype(np.float32)
    x[::3] *= -1
    moving = set()
    for op in CANDIDATES:
        model = _unary(onnx, op, ["n", 7])
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        xin = np.abs(x) if op in ("Log", "Sqrt") else x
        full = sess.run(None, {"x": xin})[0]
        for n in range(1, 65):
            if not np.array_equal(sess.run(None, {"x": xin[:n]})[0], full[:n], equal_nan=True):
                moving.add(op)
                break
    assert moving <= POSITION_DEPENDENT_OPS, sorted(moving - POSITION_DEPENDENT_OPS)
    assert "Softplus" in moving  # the test can see the effect on this build


@pytest.mark.parametrize("samples", [None, 1, 3, 8, 20])
def test_padded_graph_rows_equal_any_row_count(tmp_path, samples):
    """A Softplus graph with a cells axis (and a samples axis): every row count gives each
    cell the bits it gets among 256 cells; the padding never reaches the outputs."""
    onnx = require("onnx")
    shape = ["n_cells", 7] if samples is None else ["n_samples", "n_cells", 7]
    path = tmp_path / "g.onnx"
    path.write_bytes(_unary(onnx, "Softplus", shape))
    g = Graph(path, "cpu")
    assert g.pads_cells
    r = np.random.default_rng(1)
    full_shape = (256, 7) if samples is None else (samples, 256, 7)
    x = r.normal(0, 3, full_shape).astype(np.float32)
    full = g.run({"x": x})["y"]
    for n in (1, 2, 3, 5, 7, 9, 13, 17, 31, 100):
        part = x[:n] if samples is None else x[:, :n]
        got = g.run({"x": part})["y"]
        assert got.shape == part.shape and got.flags.c_contiguous
        want = full[:n] if samples is None else full[:, :n]
        assert np.array_equal(got, want), n
    assert ROW_MULTIPLE == 16


def test_graph_without_such_operators_runs_as_given():
    for name in ("encoder", "decoder"):
        assert not Graph(MODELS / "pbmc_scvi" / f"{name}.onnx", "cpu").pads_cells
    assert Graph(MODELS / "pbmc_totalvi" / "decoder.onnx", "cpu").pads_cells


def _methods(model, data, bs):
    ad = require("anndata")
    adata = ad.read_h5ad(data)[:90]
    out = {
        "latent": model.get_latent_representation(adata, return_dist=True, batch_size=bs),
        "elbo": model.get_elbo(adata, return_mean=False, seed=3, batch_size=bs),
        "rec": model.get_reconstruction_error(adata, return_mean=False, seed=3, batch_size=bs),
        "mll": model.get_marginal_ll(
            adata[:30], n_mc_samples=24, return_mean=False, seed=3, batch_size=bs
        ),
    }
    return out


@pytest.mark.parametrize("bundle, data", [("pbmc_totalvi", CITE_H5AD), ("pbmc_peakvi", PEAKS_H5AD)])
def test_shipped_models_bit_identical_any_batch_size(bundle, data):
    model = scvi_onnx.load(MODELS / bundle, device="cpu")
    ref = _methods(model, data, None)
    for bs in (1, 7, 9, 13):
        got = _methods(model, data, bs)
        for k, v in ref.items():
            if isinstance(v, dict):
                for key in v:
                    assert np.array_equal(got[k][key], v[key]), (bs, k, key)
            elif isinstance(v, tuple):
                for a, b in zip(got[k], v, strict=True):
                    assert np.array_equal(a, b), (bs, k)
            else:
                assert np.array_equal(got[k], v), (bs, k)
