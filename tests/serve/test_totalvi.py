"""TOTALVI served: the protein counts as a ``proteins`` input (in the model's order, or named by
``protein_names``), spoken by the official ``tritonclient`` and by ``scvi_onnx.connect``, every
output per cell equal to the library's; a model set up with ``setup_mudata`` served from
MuData requests. One server for the module (the shipped TOTALVI, and a tiny MuData TOTALVI
trained here where scvi-tools is installed)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ..conftest import MODELS, require
from .conftest import ServerProcess

tc = require("tritonclient.http")
ad = require("anndata")

import scvi_onnx  # noqa: E402

TOTALVI = MODELS / "pbmc_totalvi"
CITE = MODELS / "example" / "pbmc_cite.h5ad"
N = 48


@pytest.fixture(scope="module")
def cells():
    return ad.read_h5ad(CITE)[:N].copy()


@pytest.fixture(scope="module")
def local():
    return scvi_onnx.load(TOTALVI, device="cpu")


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess([str(TOTALVI), "--port", "0", "--host", "127.0.0.1"])
    yield proc
    proc.stop()


def _tensor(name, arr, datatype, binary=True):
    t = tc.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


def _strings(values):
    return np.array([str(v).encode() for v in values], dtype=object)


def _inputs(cells, local, binary=True, proteins=None, names=None):
    x = np.asarray(cells[:, list(local.genes)].X.todense(), dtype=np.float32)
    if proteins is None:
        proteins = cells.obsm["protein_expression"][list(local.proteins)].to_numpy(np.float32)
    out = [
        _tensor("counts", x, "FP32", binary),
        _tensor("batch", _strings(cells.obs["batch"]), "BYTES", binary),
        _tensor("proteins", proteins, "FP32", binary),
    ]
    if names is not None:
        out.append(_tensor("protein_names", _strings(names), "BYTES", binary))
    return out


def test_metadata_lists_the_protein_inputs(server, local):
    md = tc.InferenceServerClient(server.host).get_model_metadata("pbmc_totalvi")
    ins = {i["name"]: i for i in md["inputs"]}
    assert ins["proteins"] == {"name": "proteins", "datatype": "FP32", "shape": [-1, 29]}
    assert ins["protein_names"]["datatype"] == "BYTES"
    assert md["parameters"]["proteins"] == list(local.proteins)
    outs = {o["name"] for o in md["outputs"]}
    assert {"reconst_loss_gene", "reconst_loss_protein", "marginal_ll"} <= outs


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_outputs_equal_the_library(server, local, cells, binary):
    c = tc.InferenceServerClient(server.host, network_timeout=120.0)
    names = ["latent", "elbo", "reconst_loss_gene", "reconst_loss_protein", "marginal_ll"]
    r = c.infer(
        "pbmc_totalvi",
        _inputs(cells, local, binary),
        outputs=[tc.InferRequestedOutput(n, binary_data=binary) for n in names],
        parameters={"seed": 5, "n_mc_samples": 20},
    )
    rec = local.get_reconstruction_error(cells, return_mean=False, seed=5)
    want = {
        "latent": local.get_latent_representation(cells),
        "elbo": local.get_elbo(cells, return_mean=False, seed=5),
        "reconst_loss_gene": rec["reconst_loss_gene"],
        "reconst_loss_protein": rec["reconst_loss_protein"],
        "marginal_ll": local.get_marginal_ll(cells, return_mean=False, seed=5, n_mc_samples=20),
    }
    for name, value in want.items():
        np.testing.assert_array_equal(r.as_numpy(name), value, err_msg=name)


def test_protein_names_reorder_and_refusals(server, local, cells):
    c = tc.InferenceServerClient(server.host, network_timeout=120.0)
    prot = cells.obsm["protein_expression"]
    # reversed, and one protein the model does not know: matched by name
    order = list(prot.columns[::-1])
    shuffled = np.concatenate(
        [prot[order].to_numpy(np.float32), np.ones((N, 1), np.float32)], axis=1
    )
    r = c.infer(
        "pbmc_totalvi",
        _inputs(cells, local, proteins=shuffled, names=[*order, "CD999_extra"]),
        outputs=[tc.InferRequestedOutput("elbo")],
        parameters={"seed": 5},
    )
    np.testing.assert_array_equal(
        r.as_numpy("elbo"), local.get_elbo(cells, return_mean=False, seed=5)
    )
    # a missing protein: the library's message, 400
    few = order[:20]
    with pytest.raises(tc.InferenceServerException) as e:
        c.infer(
            "pbmc_totalvi",
            _inputs(cells, local, proteins=prot[few].to_numpy(np.float32), names=few),
        )
    assert e.value.status() == "400" and "proteins" in str(e.value) and "missing" in str(e.value)
    # no names and the wrong width
    with pytest.raises(tc.InferenceServerException) as e:
        c.infer("pbmc_totalvi", _inputs(cells, local, proteins=prot[few].to_numpy(np.float32)))
    assert e.value.status() == "400" and "29 proteins" in str(e.value)
    # no proteins at all
    with pytest.raises(tc.InferenceServerException) as e:
        c.infer("pbmc_totalvi", _inputs(cells, local)[:2])
    assert e.value.status() == "400" and "missing input 'proteins'" in str(e.value)
    # an unknown input: the message lists the protein inputs too (it left them out)
    extra = tc.InferInput("foo", [N], "FP32")
    extra.set_data_from_numpy(np.zeros(N, np.float32))
    with pytest.raises(tc.InferenceServerException) as e:
        c.infer("pbmc_totalvi", [*_inputs(cells, local), extra])
    assert e.value.status() == "400" and "'proteins', 'protein_names'" in str(e.value)
    # a negative protein count: the library's typed value error
    bad = prot[list(local.proteins)].to_numpy(np.float32)
    bad[3, 2] = -1
    with pytest.raises(tc.InferenceServerException) as e:
        c.infer("pbmc_totalvi", _inputs(cells, local, proteins=bad))
    assert e.value.status() == "400" and "negative" in str(e.value)


def test_connect_gives_the_library_numbers(server, local, cells):
    remote = scvi_onnx.connect(server.url, chunk_cells=20)  # three requests
    np.testing.assert_array_equal(
        remote.get_latent_representation(cells), local.get_latent_representation(cells)
    )
    assert remote.get_reconstruction_error(cells) == local.get_reconstruction_error(cells)
    np.testing.assert_array_equal(
        remote.get_elbo(cells, return_mean=False), local.get_elbo(cells, return_mean=False)
    )
    # the proteins as an array in the model's order (no names): by position, as in memory
    arr = cells.copy()
    arr.obsm["protein_expression"] = cells.obsm["protein_expression"][
        list(local.proteins)
    ].to_numpy()
    np.testing.assert_array_equal(
        remote.get_latent_representation(arr), local.get_latent_representation(arr)
    )


# ----------------------------------------------------------------------------- MuData
@pytest.fixture(scope="module")
def mudata_served(tmp_path_factory, cells):
    """A tiny TOTALVI set up with setup_mudata (RNA in "gex" X, proteins in a layer of "adt",
    the batch in the MuData's own obs), exported and served."""
    scvi = require("scvi")
    md = require("mudata")
    from scvi_onnx.exporter import export_model
    from scvi_onnx.exporter.parity import QUIET_TRAINING

    a = ad.read_h5ad(CITE)
    prot = a.obsm["protein_expression"]
    adt = ad.AnnData(
        X=np.zeros(prot.shape, np.float32), obs=a.obs[[]].copy(), layers={"counts": prot.to_numpy()}
    )
    adt.var_names = list(prot.columns)
    gex = ad.AnnData(X=a.X.copy(), obs=a.obs[[]].copy(), var=a.var[[]].copy())
    mdata = md.MuData({"gex": gex, "adt": adt})
    mdata.obs["batch"] = a.obs["batch"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.TOTALVI.setup_mudata(
            mdata,
            protein_layer="counts",
            batch_key="batch",
            modalities={"rna_layer": "gex", "protein_layer": "adt"},
        )
        scvi.settings.seed = 0
        model = scvi.model.TOTALVI(mdata, n_hidden=16, n_latent=5)
        model.train(
            max_epochs=2,
            reduce_lr_on_plateau=False,  # its learning-rate monitor needs a logger
            **QUIET_TRAINING,
        )
    path = export_model(model, tmp_path_factory.mktemp("mudata") / "totalvi_mu")
    proc = ServerProcess([str(path), "--port", "0", "--host", "127.0.0.1"])
    yield mdata[:N].copy(), scvi_onnx.load(path, device="cpu"), proc
    proc.stop()


def test_mudata_model_served(mudata_served):
    mdata, local, proc = mudata_served
    remote = scvi_onnx.connect(proc.url)
    np.testing.assert_array_equal(
        remote.get_latent_representation(mdata), local.get_latent_representation(mdata)
    )
    np.testing.assert_array_equal(
        remote.get_elbo(mdata, return_mean=False), local.get_elbo(mdata, return_mean=False)
    )
    from scvi_onnx.errors import InputDataError

    with pytest.raises(InputDataError, match="setup_mudata"):
        remote.get_latent_representation(mdata["gex"])


def test_mudata_requests_leave_the_warning_filters_alone(mudata_served):
    """The MuData a request becomes is built with mudata's FutureWarning hidden (every obs
    column is set by the server), under a lock: ``catch_warnings`` swaps the process's filters,
    and requests prepared on several threads at once (decoding threads, workers) must not
    leave another thread's "ignore" installed. Sixteen requests on four threads: the filters
    are the same after, every answer equals the first, and mudata's notice never shows."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from scvi_onnx.serve.models import Limits, ServedModel
    from scvi_onnx.serve.protocol import parse_request

    mdata, local, _ = mudata_served
    x = np.asarray(
        mdata["gex"].X.todense() if hasattr(mdata["gex"].X, "todense") else mdata["gex"].X,
        dtype=np.float32,
    )
    prot = np.asarray(mdata["adt"].layers["counts"], dtype=np.float32)
    doc = {
        "inputs": [
            {
                "name": "counts",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            },
            {
                "name": "batch",
                "datatype": "BYTES",
                "shape": [x.shape[0]],
                "data": [str(b) for b in mdata.obs["batch"]],
            },
            {
                "name": "proteins",
                "datatype": "FP32",
                "shape": list(prot.shape),
                "data": prot.ravel().tolist(),
            },
        ],
        "outputs": [{"name": "latent"}, {"name": "elbo"}],
    }
    body = json.dumps(doc).encode()
    served = ServedModel("totalvi_mu", local, Limits())
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inside = list(warnings.filters)
        with ThreadPoolExecutor(4) as ex:
            answers = list(
                ex.map(lambda _: served.infer(parse_request(body, None)).body, range(16))
            )
        assert warnings.filters == inside
    assert warnings.filters == before
    assert all(a == answers[0] for a in answers)
    assert not [w for w in caught if "pull obs/var columns" in str(w.message)]
