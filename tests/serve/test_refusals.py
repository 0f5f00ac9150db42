"""Refusals: every bad request is a 4xx with ``{"error": ...}`` naming what was wrong (the
library's typed message for bad data), never a traceback, and the next request is served as if
nothing happened. A bundle that is tampered, unreadable or not the pinned one stops the server
before it listens, with one line naming the file."""

from __future__ import annotations

import http.client
import json
import socket

import numpy as np
import pytest

from ..conftest import require
from .conftest import SHIPPED, ServerProcess

tc = require("tritonclient.http")


def post(server, body, headers=None, path="/v2/models/pbmc_scvi/infer", token=True):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    h = {"Authorization": f"Bearer {server.token}"} if token else {}
    conn.request("POST", path, body=body, headers={**h, **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def request_doc(x, batch, datatype="FP32", outputs=None, parameters=None):
    doc = {
        "inputs": [
            {
                "name": "counts",
                "datatype": datatype,
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            },
            {"name": "batch", "datatype": "BYTES", "shape": [len(batch)], "data": list(batch)},
        ]
    }
    if outputs:
        doc["outputs"] = [{"name": o} for o in outputs]
    if parameters:
        doc["parameters"] = parameters
    return doc


@pytest.fixture(scope="module")
def cells(shipped, query):
    part = query[:4]
    return np.asarray(part[:, list(shipped.genes)].X.todense(), np.float32), list(part.obs["batch"])


def refused(server, doc_or_body, status=400, headers=None, **kw):
    body = doc_or_body if isinstance(doc_or_body, bytes) else json.dumps(doc_or_body)
    got, _, data = post(server, body, headers, **kw)
    assert got == status, data
    err = json.loads(data)["error"]
    assert "Traceback" not in err and 'File "' not in err
    return err


def still_serves(server, cells, shipped, query):
    x, batch = cells
    status, _, data = post(server, json.dumps(request_doc(x, batch)))
    assert status == 200
    got = np.array(json.loads(data)["outputs"][0]["data"], np.float32).reshape(4, 10)
    np.testing.assert_array_equal(got, shipped.get_latent_representation(query[:4]))


BAD_REQUESTS = {
    "not json": (b"{not json", "not valid JSON"),
    "no inputs": ({"inputs": []}, "non-empty 'inputs'"),
    "unknown datatype": (
        {"inputs": [{"name": "counts", "datatype": "FP8", "shape": [1], "data": [1]}]},
        "unknown datatype 'FP8'",
    ),
    "shape/data mismatch": (
        {"inputs": [{"name": "counts", "datatype": "FP32", "shape": [2, 2000], "data": [1.0]}]},
        "holds 4000 elements but data has 1",
    ),
    "strings as FP32": (
        {"inputs": [{"name": "counts", "datatype": "FP32", "shape": [1], "data": ["a"]}]},
        "FP32 data must be numbers",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_malformed_requests(server, cells, shipped, query, case):
    doc, words = BAD_REQUESTS[case]
    assert words in refused(server, doc)
    still_serves(server, cells, shipped, query)


def test_bad_inputs_get_the_library_typed_message(server, cells, shipped, query):
    x, batch = cells
    # wrong datatype for the counts
    doc = request_doc(np.zeros((4, 2000), np.uint64), batch, datatype="UINT64")
    assert "datatype UINT64" in refused(server, doc)
    # NaN in the counts (JSON's NaN literal, and in binary below)
    xn = x.copy()
    xn[2, 7] = np.nan
    err = refused(server, json.dumps(request_doc(xn, batch)).encode())
    assert "NaN" in err and "cell 2" in err
    # unseen category, where the result depends on it (the ELBO: the decoder takes the batch)
    unseen = ["pbmc_5k", "pbmc_5k", "pbmc_99k", "pbmc_5k"]
    err = refused(server, request_doc(x, unseen, outputs=["elbo"]))
    assert "pbmc_99k" in err and "pbmc_10k" in err and "unseen_as" in err
    # ... and mapped to a training category with the library's unseen_as
    status, _, data = post(
        server,
        json.dumps(
            request_doc(
                x, unseen, outputs=["elbo"], parameters={"unseen_as": {"batch": "pbmc_10k"}}
            )
        ),
    )
    assert status == 200, data
    assert "unseen_as" in refused(
        server, request_doc(x, unseen, outputs=["elbo"], parameters={"unseen_as": "pbmc_10k"})
    )
    # missing input (the registered batch column, for the ELBO, which depends on it)
    doc = request_doc(x, batch, outputs=["elbo"])
    del doc["inputs"][1]
    err = refused(server, doc)
    assert "'batch'" in err
    doc = request_doc(x, batch)
    del doc["inputs"][0]
    assert "missing input 'counts'" in refused(server, doc)
    # wrong number of genes, unknown input / output / parameter, out-of-range parameter
    assert "has 1999 columns but the model has 2000 genes" in refused(
        server, request_doc(x[:, :-1], batch)
    )
    doc = request_doc(x, batch)
    doc["inputs"].append({"name": "donor", "datatype": "BYTES", "shape": [4], "data": ["a"] * 4})
    assert "unknown input 'donor'" in refused(server, doc)
    assert "unknown output 'umap'" in refused(server, request_doc(x, batch, outputs=["umap"]))
    assert "unknown parameter 'sed'" in refused(
        server, request_doc(x, batch, parameters={"sed": 1})
    )
    err = refused(
        server, request_doc(x, batch, outputs=["marginal_ll"], parameters={"n_mc_samples": 0})
    )
    assert "n_mc_samples must be a positive integer" in err
    err = refused(server, request_doc(x, batch, parameters={"seed": "1"}))
    assert "seed must be an integer" in err
    err = refused(
        server, request_doc(x, batch, outputs=["marginal_ll"], parameters={"n_mc_samples": 10**6})
    )
    assert "--max-mc-samples" in err
    # negative counts; too many cells
    assert "negative" in refused(server, request_doc(-x, batch))
    big = np.zeros((301, 2000), np.float32)
    doc = request_doc(big, ["pbmc_5k"] * 301)
    assert "--max-cells" in refused(server, doc)
    still_serves(server, cells, shipped, query)


def test_binary_refusals_with_tritonclient(server, cells, shipped, query):
    x, batch = cells
    c = tc.InferenceServerClient(server.host)
    h = {"Authorization": f"Bearer {server.token}"}
    xn = x.copy()
    xn[1, 0] = np.nan
    counts = tc.InferInput("counts", list(x.shape), "FP32")
    counts.set_data_from_numpy(xn)
    b = tc.InferInput("batch", [4], "BYTES")
    b.set_data_from_numpy(np.array([s.encode() for s in batch], dtype=object))
    with pytest.raises(tc.InferenceServerException) as e:
        c.infer("pbmc_scvi", [counts, b], headers=h)
    assert e.value.status() == "400" and "NaN" in e.value.message()
    fp16 = tc.InferInput("counts", list(x.shape), "FP16")
    fp16.set_data_from_numpy(x.astype(np.float16))
    with pytest.raises(tc.InferenceServerException) as e:
        c.infer("pbmc_scvi", [fp16, b], headers=h)
    assert e.value.status() == "400" and "datatype FP16" in e.value.message()
    # a binary_data_size that does not match the shape
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "counts",
                    "datatype": "FP32",
                    "shape": [4, 2000],
                    "parameters": {"binary_data_size": 12},
                }
            ]
        }
    ).encode()
    err = refused(
        server, head + b"\0" * 12, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert "does not match shape" in err
    still_serves(server, cells, shipped, query)


def test_oversize_body_is_413_before_it_is_read(server, cells, shipped, query):
    """Content-Length over the limit: 413 at once, though not one byte of the body was sent."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v2/models/pbmc_scvi/infer")
    conn.putheader("Authorization", f"Bearer {server.token}")
    conn.putheader("Content-Length", str(5 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413
    assert "--max-request-bytes" in json.loads(r.read())["error"]
    conn.close()
    # a chunked body (no Content-Length) is counted while it streams; the server answers and
    # closes as soon as it passes the limit, so a client still sending may instead see the
    # connection reset (TCP drops the unread rest): either way, nothing past the limit is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b"x" * (1 << 20) for _ in range(6))
    try:
        conn.request(
            "POST",
            "/v2/models/pbmc_scvi/infer",
            body=chunks,
            headers={"Authorization": f"Bearer {server.token}", "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        assert conn.getresponse().status == 413
    except (ConnectionResetError, BrokenPipeError):
        pass
    conn.close()
    # tritonclient sending too many cells in binary: 413 too
    c = tc.InferenceServerClient(server.host)
    big = tc.InferInput("counts", [600, 2000], "FP32")
    big.set_data_from_numpy(np.zeros((600, 2000), np.float32))
    try:
        c.infer("pbmc_scvi", [big], headers={"Authorization": f"Bearer {server.token}"})
        raise AssertionError("an over-limit request was served")
    except tc.InferenceServerException as e:
        assert e.status() == "413"
    except (ConnectionResetError, BrokenPipeError):
        pass
    text = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    text.request("GET", "/metrics", headers={"Authorization": f"Bearer {server.token}"})
    metrics = text.getresponse().read().decode()
    assert 'route="infer",model="pbmc_scvi",code="413"' in metrics
    still_serves(server, cells, shipped, query)


def test_token_required_except_health(server, cells):
    x, batch = cells
    body = json.dumps(request_doc(x, batch))
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-of-some-length"},
        {"Authorization": server.token},
    ):
        status, h, data = post(server, body, headers, token=False)
        assert status == 401, headers
        assert h.get("www-authenticate", "").startswith("Bearer")
        assert "bearer token" in json.loads(data)["error"]
    for path in (
        "/v2",
        "/v2/models/pbmc_scvi",
        "/v2/models/pbmc_scvi/ready",
        "/metrics",
        "/v2/models",
    ):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", path)
        assert conn.getresponse().status == 401, path
        conn.close()
    for path in ("/v2/health/live", "/v2/health/ready"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", path)
        assert conn.getresponse().status == 200, path
        conn.close()
    c = tc.InferenceServerClient(server.host)
    with pytest.raises(tc.InferenceServerException) as e:
        c.get_model_metadata("pbmc_scvi")
    assert e.value.status() == "401"


def test_half_sent_body_then_disconnect(server, cells, shipped, query):
    """A client that goes away mid-body: the server keeps serving."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(
        b"POST /v2/models/pbmc_scvi/infer HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {server.token}\r\n".encode()
        + b"Content-Length: 100000\r\n\r\n"
        + b"{" * 5000
    )
    s.close()
    still_serves(server, cells, shipped, query)


# ------------------------------------------------------------------------- bundles at start
def one_error_line(proc: ServerProcess) -> str:
    rc = proc.wait_exit(120)
    assert rc != 0
    errors = [line for line in proc.lines if line.startswith("scvi-onnx: error:")]
    assert len(errors) == 1, proc.lines
    assert not any("Traceback" in line for line in proc.lines)
    assert proc.url is None  # never listened
    return errors[0]


def test_tampered_bundle_does_not_start(tampered_bundle):
    enc = tampered_bundle / "encoder.onnx"
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 0xFF
    enc.write_bytes(bytes(data))
    line = one_error_line(
        ServerProcess([str(SHIPPED), str(tampered_bundle), "--port", "0"], wait=False)
    )
    assert "encoder.onnx" in line and "altered" in line and str(tampered_bundle) in line


def test_unreadable_bundle_does_not_start(tampered_bundle):
    (tampered_bundle / "manifest.json").write_text("{ not json")
    line = one_error_line(ServerProcess([str(tampered_bundle), "--port", "0"], wait=False))
    assert "manifest.json" in line


def test_pinned_digest(shipped, tampered_bundle):
    """The digest pins the manifest, so a rewritten manifest with fresh checksums (a bundle
    that is whole, but not the validated one) is refused too."""
    man = json.loads((tampered_bundle / "manifest.json").read_text())
    man["validation"]["atol"] = 1.0  # a consistent but different bundle
    (tampered_bundle / "manifest.json").write_text(json.dumps(man))
    line = one_error_line(
        ServerProcess(
            ["--name", f"p={tampered_bundle}@{shipped.digest}", "--port", "0"], wait=False
        )
    )
    assert "manifest.json" in line and shipped.digest in line and "not the expected" in line


def test_peakvi_is_served_with_the_library_numbers():
    """PEAKVI (regions as the genes, no library size) through the client: latent, per-cell
    ELBO and reconstruction error equal to the local model's."""
    import anndata as ad
    import numpy as np

    import scvi_onnx

    peakvi = SHIPPED.parent / "pbmc_peakvi"
    cells = ad.read_h5ad(SHIPPED.parent / "example" / "pbmc_peaks.h5ad")[:40].copy()
    local = scvi_onnx.load(peakvi)
    proc = ServerProcess([str(peakvi), "--port", "0"])
    try:
        remote = scvi_onnx.connect(proc.url, model="pbmc_peakvi")
        assert remote.model_class == "PEAKVI"
        np.testing.assert_array_equal(
            remote.get_latent_representation(cells), local.get_latent_representation(cells)
        )
        np.testing.assert_array_equal(
            remote.get_elbo(cells, return_mean=False), local.get_elbo(cells, return_mean=False)
        )
        assert remote.get_reconstruction_error(cells) == local.get_reconstruction_error(cells)
    finally:
        proc.stop()
