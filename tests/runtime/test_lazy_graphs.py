"""Graphs other than the encoder open on their first run: a call that needs only the encoder
(the latent space, a latent-only server) never reads the decoder's weights. Their inputs and
outputs come from the file meanwhile (``sessions.ops.signature``), as ONNX Runtime gives them."""

from __future__ import annotations

import shutil
import threading

import anndata as ad
import numpy as np
import pytest

import scvi_onnx
from scvi_onnx.errors import BundleIntegrityError
from scvi_onnx.sessions import Graph
from scvi_onnx.sessions import graph as graph_module
from scvi_onnx.sessions.ops import file_signature

from ..conftest import MODELS, require

BUNDLES = ("pbmc_scvi", "pbmc_peakvi", "pbmc_totalvi")
DATA = {
    "pbmc_scvi": MODELS / "example" / "pbmc_query.h5ad",
    "pbmc_peakvi": MODELS / "example" / "pbmc_peaks.h5ad",
    "pbmc_totalvi": MODELS / "example" / "pbmc_cite.h5ad",
}


def test_signature_read_as_onnxruntime_reads_it():
    import onnxruntime as ort

    graphs = sorted(MODELS.glob("*/*.onnx"))
    assert len(graphs) >= 8
    for p in graphs:
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        want = (
            [(i.name, i.shape) for i in s.get_inputs()],
            [(o.name, o.shape) for o in s.get_outputs()],
        )
        assert file_signature(p) == want, p


def test_graph_without_initializers_listed_as_inputs(tmp_path):
    """An older graph may list its initializers among the graph inputs: they are not inputs
    (ONNX Runtime does not list them either)."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n_cells", 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n_cells", 2])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert file_signature(path) == (
        [(i.name, i.shape) for i in s.get_inputs()],
        [(o.name, o.shape) for o in s.get_outputs()],
    )
    assert file_signature(path)[0] == [("x", ["n_cells", 3])]


@pytest.mark.parametrize("name", BUNDLES)
def test_only_the_encoder_opens_at_load_and_for_the_latent_space(name):
    model = scvi_onnx.load(MODELS / name, device="cpu")
    module = model.module
    others = [g for g in vars(module).values() if isinstance(g, Graph) and g is not module.encoder]
    assert others and module.encoder.opened and not any(g.opened for g in others)
    adata = ad.read_h5ad(DATA[name])
    idx = np.arange(50)
    z = model.get_latent_representation(adata, indices=idx)
    assert not any(g.opened for g in others)
    elbo = model.get_elbo(adata, indices=idx, return_mean=False)
    assert module.decoder.opened
    # the same numbers as graphs opened at load
    eager = scvi_onnx.load(MODELS / name, device="cpu")
    for key, g in vars(eager.module).items():
        if isinstance(g, Graph) and not g.opened:
            assert g.session is not None  # opened now
            assert g.opened, key
    np.testing.assert_array_equal(eager.get_latent_representation(adata, indices=idx), z)
    np.testing.assert_array_equal(eager.get_elbo(adata, indices=idx, return_mean=False), elbo)


def test_concurrent_first_runs_open_one_session(monkeypatch):
    model = scvi_onnx.load(MODELS / "pbmc_scvi", device="cpu")
    decoder = model.module.decoder
    created = []
    create = graph_module.create_session

    def counting(*a, **k):
        created.append(1)
        return create(*a, **k)

    monkeypatch.setattr(graph_module, "create_session", counting)
    barrier = threading.Barrier(8)
    sessions = []

    def first_use():
        barrier.wait()
        sessions.append(decoder.session)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 1 and len({id(s) for s in sessions}) == 1


def test_a_malformed_graph_is_refused_at_load_without_checksums(tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(MODELS / "pbmc_scvi", bundle)
    (bundle / "decoder.onnx").write_bytes(b"\x3a\xff\xff\xff\x0f")
    with pytest.raises(BundleIntegrityError, match="decoder.onnx is not a valid ONNX graph"):
        scvi_onnx.load(bundle, device="cpu", verify_checksums=False)
    # with the checksums (the default), the altered file is named before anything is read
    with pytest.raises(BundleIntegrityError, match="decoder.onnx"):
        scvi_onnx.load(bundle, device="cpu")


def _softplus_graph(tmp_path, output_shape):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softplus", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n_cells", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("output_shape", [None, [None, 3]])
def test_a_lazy_graph_pads_as_an_eager_one_where_the_file_names_no_axis(tmp_path, output_shape):
    """An output the file leaves without a named cells axis (ONNX Runtime infers one): the
    lazy graph opens at once and pads by ONNX Runtime's shapes (it ran unpadded)."""
    path = _softplus_graph(tmp_path, output_shape)
    eager, lazy = Graph(path, "cpu"), Graph(path, "cpu", lazy=True)
    assert eager.pads_cells and lazy.pads_cells and lazy.opened
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32) * 10
    np.testing.assert_array_equal(eager.run({"x": x})["y"], lazy.run({"x": x})["y"])


def test_signature_of_a_negative_dimension_is_none_as_onnxruntime_gives_it(tmp_path):
    path = _softplus_graph(tmp_path, ["n_cells", 3])
    import onnx

    model = onnx.load(path)
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = -1
    onnx.save(model, path)
    assert file_signature(path)[1] == [("y", ["n_cells", None])]


def test_files_that_cannot_be_mapped_are_read(tmp_path, monkeypatch):
    import mmap

    from scvi_onnx.sessions import ops

    path = MODELS / "pbmc_totalvi" / "decoder.onnx"
    want = ops.file_op_types(path), ops.file_signature(path)

    def refuse(*a, **k):
        raise OSError(19, "No such device")  # FUSE with direct_io

    monkeypatch.setattr(mmap, "mmap", refuse)
    assert (ops.file_op_types(path), ops.file_signature(path)) == want


def test_too_deeply_nested_graph_is_a_value_error(tmp_path):
    """A parse that fails other than with ValueError (here RecursionError) is not turned into
    a BufferError by the map it reads (its traceback held slices of it)."""
    from scvi_onnx.sessions.ops import file_op_types

    # 2,000 nested If subgraphs: ModelProto.graph > NodeProto (op If) > attribute g > ...
    def varint(n):
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(number, payload):
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    graph = field(1, field(4, b"Relu"))
    for _ in range(2000):
        node = field(4, b"If") + field(5, field(6, graph))
        graph = field(1, node)
    path = tmp_path / "deep.onnx"
    path.write_bytes(field(7, graph))
    with pytest.raises(ValueError):
        file_op_types(path)


def test_cpu_sessions_keep_no_memory_pattern():
    """CPU sessions run without ONNX Runtime's memory pattern (a block for all of a call's
    intermediates, kept per input shape and per concurrent call)."""
    model = scvi_onnx.load(MODELS / "pbmc_scvi", device="cpu")
    options = model.module.encoder.session.get_session_options()
    assert options.enable_mem_pattern is False
    assert options.intra_op_num_threads == 1


def test_sparse_encoders_read_their_weights_after_the_decoder_opens(tmp_path, monkeypatch):
    """With the sparse encoders, a scoring method opens the decoder before the encoders read
    their first layers (126 MB each at 100,000 regions): opening a session briefly holds
    twice the graph, and that moment then does not add to them."""
    require("scvi")
    from scvi_onnx.sessions.input_layer import InputLayer

    from ..peaks import export_sparse_peakvi

    path, _, adata = export_sparse_peakvi(tmp_path / "b", n_regions=300, epochs=1)
    model = scvi_onnx.load(path, device="cpu", input_layer="sparse")
    decoder_open_at_read = {}
    weight = InputLayer.weight

    def reading(layer):
        if layer._w is None:  # (threads may arrive together: one reads)
            decoder_open_at_read.setdefault(id(layer), []).append(model.module.decoder.opened)
        return weight.fget(layer)

    monkeypatch.setattr(InputLayer, "weight", property(reading))
    elbo = model.get_elbo(adata, return_mean=False)
    # the encoder's and the depth encoder's first layers
    assert len(decoder_open_at_read) == 2
    assert all(all(v) for v in decoder_open_at_read.values())
    fresh = scvi_onnx.load(path, device="cpu", input_layer="sparse")
    fresh.get_latent_representation(adata)  # the latent space: W first, no decoder
    assert not fresh.module.decoder.opened
    np.testing.assert_array_equal(fresh.get_elbo(adata, return_mean=False), elbo)


def test_the_marginal_ll_never_holds_the_sparse_first_layers(tmp_path, monkeypatch):
    """The marginal LL reads the sparse first layers from their files block by block (one
    product per minibatch, then minutes of decoding that need neither ``W``) and computes
    the depth factors once per minibatch: no ``W`` is kept, and the values are those of a
    model holding them (after the latent space), bit for bit, at any batch size."""
    require("scvi")
    import scvi_onnx.sessions.input_layer as il

    from ..peaks import export_sparse_peakvi

    path, _, adata = export_sparse_peakvi(tmp_path / "b", n_regions=300, epochs=1)
    monkeypatch.setattr(il, "PRODUCT_BLOCK_ROWS", 128)  # three blocks of the 300 regions
    lean = scvi_onnx.load(path, device="cpu", input_layer="sparse")
    layers = [lean.module.sparse.z_layer, lean.module.sparse.d_layer]
    kw = {"n_mc_samples": 20, "return_mean": False, "indices": np.arange(60)}
    got = lean.get_marginal_ll(adata, batch_size=25, **kw)
    assert not any(layer.resident for layer in layers)
    held = scvi_onnx.load(path, device="cpu", input_layer="sparse")
    held.get_latent_representation(adata)
    assert held.module.sparse.z_layer.resident
    np.testing.assert_array_equal(held.get_marginal_ll(adata, batch_size=60, **kw), got)
    assert np.isfinite(got).all()
