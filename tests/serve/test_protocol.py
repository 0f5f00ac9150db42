"""The Open Inference Protocol routes, spoken by the official ``tritonclient`` (JSON and binary
tensor data) and by plain HTTP: every route, and every output equal to the library's for the
same cells, order and seed."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from ..conftest import require

tc = require("tritonclient.http")

OUTPUTS_SCVI = ("latent", "latent_variance", "qz_mean", "latent_sample", "elbo")
MODES = pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])


def client(server):
    return tc.InferenceServerClient(server.host, network_timeout=120.0)


def auth(server):
    return {"Authorization": f"Bearer {server.token}"}


def dense(adata, genes):
    return np.asarray(adata[:, list(genes)].X.todense(), dtype=np.float32)


def tensor(name, arr, datatype, binary):
    t = tc.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


def strings(values):
    return np.array([str(v).encode() for v in values], dtype=object)


def get(server, path, token=True):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", path, headers=auth(server) if token else {})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body


# ---------------------------------------------------------------------------------- routes
def test_health_server_and_model_routes(server):
    c = client(server)
    h = auth(server)
    assert c.is_server_live()  # health routes need no token
    assert c.is_server_ready()
    assert c.is_model_ready("pbmc_scvi", headers=h)
    assert c.is_model_ready("scanvi", headers=h)
    meta = c.get_server_metadata(headers=h)
    assert meta["name"] == "scvi-onnx" and "binary_tensor_data" in meta["extensions"]
    status, _, body = get(server, "/v2/models")
    assert status == 200
    assert sorted(m["name"] for m in json.loads(body)["models"]) == ["pbmc_scvi", "scanvi"]


def test_model_metadata_lists_inputs_outputs_genes_and_digest(server, shipped, scanvi):
    c = client(server)
    md = c.get_model_metadata("pbmc_scvi", headers=auth(server))
    assert md["name"] == "pbmc_scvi" and md["platform"] == "scvi-onnx"
    # the version is derived from the bundle digest, which `info` and the library show
    assert shipped.digest.startswith("sha256:")
    assert md["versions"] == [shipped.digest[len("sha256:") :][:12]]
    assert md["parameters"]["digest"] == shipped.digest
    assert md["parameters"]["genes"] == list(shipped.genes)
    ins = {i["name"]: i for i in md["inputs"]}
    assert ins["counts"] == {"name": "counts", "datatype": "FP32", "shape": [-1, 2000]}
    assert ins["batch"]["datatype"] == "BYTES" and "gene_names" in ins
    outs = {o["name"]: (o["datatype"], o["shape"]) for o in md["outputs"]}
    assert outs["latent"] == ("FP32", [-1, 10]) and outs["marginal_ll"] == ("FP64", [-1])
    assert "label" not in outs

    md = c.get_model_metadata("scanvi", headers=auth(server))
    ins = {i["name"]: i["datatype"] for i in md["inputs"]}
    assert ins == {
        "counts": "FP32",
        "gene_names": "BYTES",
        "batch": "BYTES",
        "cell_type": "BYTES",
        "donor": "BYTES",
        "pct": "FP32",
    }
    outs = {o["name"]: (o["datatype"], o["shape"]) for o in md["outputs"]}
    assert outs["label"] == ("BYTES", [-1])
    assert outs["label_probabilities"] == ("FP32", [-1, len(scanvi.labels)])
    assert md["parameters"]["labels"] == list(scanvi.labels)


def test_version_routes(server, shipped, query):
    c = client(server)
    h = auth(server)
    version = c.get_model_metadata("pbmc_scvi", headers=h)["versions"][0]
    assert c.get_model_metadata("pbmc_scvi", model_version=version, headers=h)["name"]
    assert c.is_model_ready("pbmc_scvi", model_version=version, headers=h)
    x = dense(query[:5], shipped.genes)
    inputs = [
        tensor("counts", x, "FP32", True),
        tensor("batch", strings(["pbmc_5k"] * 5), "BYTES", True),
    ]
    r = c.infer("pbmc_scvi", inputs, model_version=version, headers=h)
    np.testing.assert_array_equal(
        r.as_numpy("latent"), shipped.get_latent_representation(query[:5])
    )
    with pytest.raises(tc.InferenceServerException) as e:
        c.infer("pbmc_scvi", inputs, model_version="0" * 12, headers=h)
    assert e.value.status() == "404" and version in e.value.message()
    with pytest.raises(tc.InferenceServerException) as e:
        c.get_model_metadata("no_such_model", headers=h)
    assert e.value.status() == "404" and "pbmc_scvi" in e.value.message()
    status, _, body = get(server, "/v2/nowhere")
    assert status == 404 and "error" in json.loads(body)


# ---------------------------------------------------------------------------------- numbers
@MODES
def test_scvi_outputs_equal_the_library(server, shipped, query, binary):
    """Every SCVI output, per cell, equal to the library's (bit for bit: the same library
    call on the same cells; JSON carries float32/float64 values exactly)."""
    c = client(server)
    x = dense(query, shipped.genes)
    inputs = [
        tensor("counts", x, "FP32", binary),
        tensor("batch", strings(query.obs["batch"]), "BYTES", binary),
    ]
    names = [*OUTPUTS_SCVI, "reconstruction_loss", "marginal_ll"]
    outputs = [tc.InferRequestedOutput(n, binary_data=binary) for n in names]
    r = c.infer(
        "pbmc_scvi",
        inputs,
        outputs=outputs,
        parameters={"seed": 11, "n_mc_samples": 30},
        headers=auth(server),
    )
    m = shipped
    qm, qv = m.get_latent_representation(query, return_dist=True)
    want = {
        "latent": m.get_latent_representation(query),
        "latent_variance": qv,
        "qz_mean": qm,
        "latent_sample": m.get_latent_representation(query, give_mean=False, seed=11),
        "elbo": m.get_elbo(query, return_mean=False, seed=11),
        "reconstruction_loss": m.get_reconstruction_error(query, return_mean=False, seed=11)[
            "reconstruction_loss"
        ],
        "marginal_ll": m.get_marginal_ll(query, return_mean=False, seed=11, n_mc_samples=30),
    }
    for name, value in want.items():
        got = r.as_numpy(name)
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)


@pytest.mark.parametrize(
    "datatype", ["UINT8", "UINT16", "INT16", "UINT32", "INT64", "INT8", "BOOL"]
)
def test_integer_count_datatypes_give_the_fp32_numbers(server, shipped, query, datatype):
    """Integer counts in any accepted integer datatype (UINT8 / UINT16: a quarter / half of
    FP32's bytes; BOOL: a binary matrix, PEAKVI's) give exactly the numbers of the same counts
    sent as FP32."""
    c = client(server)
    x = dense(query, shipped.genes)
    if datatype in ("UINT8", "INT8"):  # every count must fit: clip a copy for this datatype
        x = np.minimum(x, 255 if datatype == "UINT8" else 127)
    if datatype == "BOOL":
        x = (x > 0).astype(np.float32)
    assert np.array_equal(x, np.rint(x))
    outputs = [tc.InferRequestedOutput(n, binary_data=True) for n in ("latent", "elbo")]
    got = {}
    for dt in ("FP32", datatype):
        arr = x.astype(tc.triton_to_np_dtype(dt))
        r = c.infer(
            "pbmc_scvi",
            [
                tensor("counts", arr, dt, True),
                tensor("batch", strings(query.obs["batch"]), "BYTES", True),
            ],
            outputs=outputs,
            parameters={"seed": 3},
            headers=auth(server),
        )
        got[dt] = {n: r.as_numpy(n) for n in ("latent", "elbo")}
    for name in ("latent", "elbo"):
        np.testing.assert_array_equal(got[datatype][name], got["FP32"][name], err_msg=name)
    if datatype == "UINT16":  # and the library's numbers for these counts
        np.testing.assert_array_equal(
            got[datatype]["latent"], shipped.get_latent_representation(query)
        )


@MODES
def test_scanvi_outputs_and_covariates_equal_the_library(server, scanvi, scanvi_bundle, binary):
    _, q = scanvi_bundle
    c = client(server)
    x = np.asarray(q.X.todense(), dtype=np.int32)  # integer counts are accepted as INT32
    inputs = [
        tensor("counts", x, "INT32", binary),
        tensor("batch", strings(q.obs["batch"]), "BYTES", binary),
        tensor("donor", strings(q.obs["donor"]), "BYTES", binary),
        tensor("pct", q.obs["pct"].to_numpy(np.float32), "FP32", binary),
    ]
    names = ["latent", "elbo", "reconstruction_loss", "marginal_ll", "label", "label_probabilities"]
    r = c.infer(
        "scanvi",
        inputs,
        outputs=[tc.InferRequestedOutput(n, binary_data=binary) for n in names],
        parameters={"seed": 5, "n_mc_samples": 20},
        headers=auth(server),
    )
    m = scanvi
    np.testing.assert_array_equal(r.as_numpy("latent"), m.get_latent_representation(q))
    np.testing.assert_array_equal(r.as_numpy("elbo"), m.get_elbo(q, return_mean=False, seed=5))
    np.testing.assert_array_equal(
        r.as_numpy("reconstruction_loss"),
        m.get_reconstruction_error(q, return_mean=False, seed=5)["reconstruction_loss"],
    )
    np.testing.assert_array_equal(
        r.as_numpy("marginal_ll"), m.get_marginal_ll(q, return_mean=False, seed=5, n_mc_samples=20)
    )
    probs = m.predict(q, soft=True)
    np.testing.assert_array_equal(r.as_numpy("label_probabilities"), probs.to_numpy())
    labels = [v.decode() if isinstance(v, bytes) else v for v in r.as_numpy("label")]
    assert labels == list(m.predict(q))
    assert set(labels) <= set(m.labels)


def test_default_output_is_the_latent_and_first_key_keys_the_noise(server, shipped, query):
    """No outputs asked: the latent, in binary (tritonclient's default). ``first_key`` keys
    the request's cells as rows first_key.. of a larger input: cells 50..59 sent alone with
    first_key=50 get the ELBO they have in the whole query."""
    c = client(server)
    part = query[50:60]
    x = dense(part, shipped.genes)
    inputs = [
        tensor("counts", x, "FP32", True),
        tensor("batch", strings(part.obs["batch"]), "BYTES", True),
    ]
    r = c.infer("pbmc_scvi", inputs, headers=auth(server))
    np.testing.assert_array_equal(r.as_numpy("latent"), shipped.get_latent_representation(part))
    elbo = [tc.InferRequestedOutput("elbo")]
    whole = shipped.get_elbo(query, return_mean=False, seed=0)
    keyed = c.infer(
        "pbmc_scvi", inputs, outputs=elbo, parameters={"first_key": 50}, headers=auth(server)
    )
    np.testing.assert_array_equal(keyed.as_numpy("elbo"), whole[50:60])
    unkeyed = c.infer("pbmc_scvi", inputs, outputs=elbo, headers=auth(server))
    assert not np.array_equal(unkeyed.as_numpy("elbo"), whole[50:60])
    np.testing.assert_array_equal(
        unkeyed.as_numpy("elbo"), shipped.get_elbo(part, return_mean=False)
    )


def test_gene_names_reorder_subset_and_fill(server, shipped, query):
    """``gene_names`` names the columns: any order and extra genes are matched by the
    library's rules; missing genes follow ``missing_genes`` / ``min_gene_overlap``."""
    c = client(server)
    rng = np.random.default_rng(3)
    perm = rng.permutation(query.n_vars)
    shuffled = query[:20, perm].copy()  # all 2500 query genes, shuffled (500 extra)
    x = np.asarray(shuffled.X.todense(), dtype=np.float32)
    batch = tensor("batch", strings(shuffled.obs["batch"]), "BYTES", True)
    names = tensor("gene_names", strings(shuffled.var_names), "BYTES", True)
    r = c.infer(
        "pbmc_scvi", [tensor("counts", x, "FP32", True), names, batch], headers=auth(server)
    )
    np.testing.assert_array_equal(
        r.as_numpy("latent"), shipped.get_latent_representation(query[:20])
    )
    sub = query[:20, list(shipped.genes)[:1700]].copy()
    xs = np.asarray(sub.X.todense(), dtype=np.float32)
    inputs = [
        tensor("counts", xs, "FP32", True),
        tensor("gene_names", strings(sub.var_names), "BYTES", True),
        batch,
    ]
    with pytest.raises(tc.InferenceServerException) as e:
        c.infer("pbmc_scvi", inputs, headers=auth(server))
    assert e.value.status() == "400" and "300 of the model's 2000 genes are missing" in str(e.value)
    r = c.infer(
        "pbmc_scvi",
        inputs,
        parameters={"missing_genes": "zero", "min_gene_overlap": 0.5},
        headers=auth(server),
    )
    np.testing.assert_array_equal(
        r.as_numpy("latent"),
        shipped.get_latent_representation(sub, missing_genes="zero", min_gene_overlap=0.5),
    )


def test_plain_http_json_request(server, shipped, query):
    """A JSON request written by hand (nested data, as the protocol allows) over http.client."""
    part = query[:3]
    x = dense(part, shipped.genes)
    doc = {
        "id": "req-1",
        "inputs": [
            {"name": "counts", "datatype": "FP32", "shape": [3, 2000], "data": x.tolist()},
            {"name": "batch", "datatype": "BYTES", "shape": [3], "data": list(part.obs["batch"])},
        ],
        "outputs": [{"name": "latent"}],
    }
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST",
        "/v2/models/pbmc_scvi/infer",
        body=json.dumps(doc),
        headers={**auth(server), "Content-Type": "application/json"},
    )
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 200, body
    assert r.getheader("X-Request-ID")
    assert body["id"] == "req-1" and body["model_name"] == "pbmc_scvi"
    (out,) = body["outputs"]
    assert out["name"] == "latent" and out["datatype"] == "FP32" and out["shape"] == [3, 10]
    got = np.array(out["data"], dtype=np.float32).reshape(3, 10)
    np.testing.assert_array_equal(got, shipped.get_latent_representation(part))


def test_compressed_request_body(server, shipped, query):
    """tritonclient's request compression (gzip / deflate) is understood."""
    c = client(server)
    part = query[:4]
    inputs = [
        tensor("counts", dense(part, shipped.genes), "FP32", True),
        tensor("batch", strings(part.obs["batch"]), "BYTES", True),
    ]
    want = shipped.get_latent_representation(part)
    for algo in ("gzip", "deflate"):
        r = c.infer("pbmc_scvi", inputs, request_compression_algorithm=algo, headers=auth(server))
        np.testing.assert_array_equal(r.as_numpy("latent"), want)


def test_metrics_prometheus_text(server):
    status, headers, body = get(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    for name in (
        "scvi_onnx_requests_total",
        "scvi_onnx_request_errors_total",
        "scvi_onnx_cells_total",
        "scvi_onnx_request_duration_seconds_bucket",
        "scvi_onnx_model_ready",
    ):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text, name
    # every sample line parses as "name{labels} value"
    for line in text.splitlines():
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    assert 'scvi_onnx_model_ready{model="pbmc_scvi"' in text


def test_bytes_shape_beyond_its_data_is_refused_before_allocating():
    """A BYTES input whose shape asks for more elements than its data can hold (each takes at
    least 4 bytes) is refused at once: a request of a few hundred bytes made the server
    allocate gigabytes (shape [300000000]) before noticing."""
    import json as _json
    import time

    from scvi_onnx.serve.protocol import ProtocolError, parse_request

    header = {
        "inputs": [
            {"name": "batch", "datatype": "BYTES", "shape": [300_000_000],
             "parameters": {"binary_data_size": 8}},
        ]
    }  # fmt: skip
    head = _json.dumps(header).encode()
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match="holds 300000000 BYTES elements but its 8 bytes"):
        parse_request(head + b"\x01\x00\x00\x00a\x00\x00\x00", len(head))
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "params, batched", [({}, True), ({"first_key": 3, "seed": 7}, True),
                        ({"first_key": -1}, False), ({"first_key": 2**70}, False),
                        ({"seed": 2**64}, False)]
)  # fmt: skip
def test_requests_the_library_refuses_are_never_batched(shipped, params, batched):
    """A batched request is computed by one library call with the others' parameters: one
    whose seed / first_key the library refuses must take the single-request path, where it
    gets its 400 (it got 200 or 400 depending on what else was in flight)."""
    from scvi_onnx.serve.models import Limits, ServedModel
    from scvi_onnx.serve.protocol import parse_request

    served = ServedModel("pbmc_scvi", shipped, Limits())
    doc = {
        "inputs": [
            {"name": "counts", "datatype": "FP32", "shape": [1, len(shipped.genes)],
             "data": [0.0] * len(shipped.genes)},
            {"name": "batch", "datatype": "BYTES", "shape": [1], "data": ["pbmc_5k"]},
        ],
        "outputs": [{"name": "qz_mean"}],
        "parameters": params,
    }  # fmt: skip
    req = parse_request(json.dumps(doc).encode(), None)
    assert (served.batch_key(req) is not None) is batched


def test_the_start_line_counts_a_peakvis_regions():
    import scvi_onnx
    from scvi_onnx.serve.models import Limits, ServedModel
    from scvi_onnx.serve.server import serving_lines

    from ..conftest import MODELS

    peakvi = scvi_onnx.load(MODELS / "pbmc_peakvi", device="cpu")
    (line,) = serving_lines({"p": ServedModel("p", peakvi, Limits())})
    assert "(PEAKVI, 2000 regions, version" in line
