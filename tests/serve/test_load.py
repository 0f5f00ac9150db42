"""Concurrent load, clients that go away, a full queue, SIGTERM while busy, the audit log and
TLS, on real servers. No timing is asserted: the tests wait for states the server reports
(its in-flight and queued gauges on /metrics)."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import scvi_onnx

from ..conftest import require
from .conftest import SHIPPED, ServerProcess

tc = require("tritonclient.http")

#: A request that keeps a worker busy for a while: the marginal LL with 500 importance
#: samples (of 50 cells: ~0.35 s of work on a quiet 2-core machine).
SLOW = {"outputs": ["marginal_ll"], "parameters": {"n_mc_samples": 500}}
#: Longer (50 / 100 / 200 cells: ~1.4 / 2.3 / 4.5 s here), for a request that must still be
#: computing while the test does several things, even on a machine many times faster.
LONG = {"outputs": ["marginal_ll"], "parameters": {"n_mc_samples": 2000}}


def doc_for(x, batch, outputs=("latent",), parameters=None):
    return {
        "inputs": [
            {
                "name": "counts",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            },
            {"name": "batch", "datatype": "BYTES", "shape": [len(batch)], "data": list(batch)},
        ],
        "outputs": [{"name": o} for o in outputs],
        "parameters": parameters or {},
    }


def post(port, doc, token=None, timeout=300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request("POST", "/v2/models/pbmc_scvi/infer", body=json.dumps(doc), headers=headers)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body


def gauge(port, name, token=None, tls=None):
    """(value, the whole /metrics text); ``tls``: an ssl context for an HTTPS server."""
    if tls is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
    text = conn.getresponse().read().decode()
    conn.close()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)), text


def wait_for(port, name, value, token=None, timeout=120, tls=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if gauge(port, name, token, tls)[0] == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} never reached {value}")


def one_worker_server(tmp_path, *options) -> ServerProcess:
    """The shipped model on one worker, with an audit log (``.audit``) and ``options``."""
    audit = tmp_path / "audit.jsonl"
    args = [str(SHIPPED), "--port", "0", "--device", "cpu", "--max-concurrency", "1"]
    s = ServerProcess([*args, "--audit-log", str(audit), *options])
    s.audit = audit
    return s


@pytest.fixture()
def busy_server(tmp_path):
    """One worker, one queue place, an audit log: easy to fill."""
    s = one_worker_server(tmp_path, "--max-queue", "1")
    yield s
    s.stop()


def test_eight_concurrent_clients_equal_serial(server, shipped, query, cells):
    """8 tritonclient clients at once, each sending its own cells with seeded ELBO requests:
    every answer equals the serial one, and the library's."""
    x, batch = cells
    h = {"Authorization": f"Bearer {server.token}"}
    parts = [np.arange(i, 200, 8) for i in range(8)]

    def ask(rows):
        c = tc.InferenceServerClient(server.host, network_timeout=300)
        counts = tc.InferInput("counts", [rows.size, 2000], "FP32")
        counts.set_data_from_numpy(x[rows])
        b = tc.InferInput("batch", [rows.size], "BYTES")
        b.set_data_from_numpy(np.array([batch[r].encode() for r in rows], dtype=object))
        outs = [tc.InferRequestedOutput("latent"), tc.InferRequestedOutput("elbo")]
        got = []
        for seed in (1, 2, 3):
            r = c.infer(
                "pbmc_scvi", [counts, b], outputs=outs, parameters={"seed": seed}, headers=h
            )
            got.append((r.as_numpy("latent"), r.as_numpy("elbo")))
        c.close()
        return got

    serial = [ask(rows) for rows in parts]
    with ThreadPoolExecutor(8) as ex:
        concurrent = list(ex.map(ask, parts))
    for rows, s, c in zip(parts, serial, concurrent, strict=True):
        for seed, (zs, es), (zc, ec) in zip((1, 2, 3), s, c, strict=True):
            np.testing.assert_array_equal(zc, zs)
            np.testing.assert_array_equal(ec, es)
            np.testing.assert_array_equal(
                ec, shipped.get_elbo(query[rows], return_mean=False, seed=seed)
            )


def test_full_queue_is_503_with_retry_after_and_the_client_retries(
    busy_server, shipped, query, cells
):
    x, batch = cells
    port = busy_server.port
    with ThreadPoolExecutor(3) as ex:
        slow = ex.submit(post, port, doc_for(x[:100], batch[:100], **LONG))
        wait_for(port, "scvi_onnx_inference_in_flight", 1)
        queued = ex.submit(post, port, doc_for(x[:5], batch[:5]))
        wait_for(port, "scvi_onnx_inference_queued", 1)
        status, headers, body = post(port, doc_for(x[:5], batch[:5]))
        assert status == 503 and headers["retry-after"] == "1"
        assert "busy" in json.loads(body)["error"]
        # the library's client waits Retry-After and tries again until a slot is free
        remote = scvi_onnx.connect(f"{busy_server.url}/v2/models/pbmc_scvi", retries=1000)
        z = ex.submit(remote.get_latent_representation, query[:5])
        assert slow.result()[0] == 200
        assert queued.result()[0] == 200
        np.testing.assert_array_equal(z.result(), shipped.get_latent_representation(query[:5]))
    text = gauge(port, "scvi_onnx_inference_in_flight")[1]
    assert 'scvi_onnx_request_errors_total{route="infer",model="pbmc_scvi",code="503"}' in text


def binary_body(x, batch, outputs, parameters, counts_name="counts"):
    """(body, header length) of a request with its counts as binary data after the JSON."""
    data = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": counts_name,
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(data)},
                },
                {"name": "batch", "datatype": "BYTES", "shape": [len(batch)], "data": list(batch)},
            ],
            "outputs": [{"name": o} for o in outputs],
            "parameters": parameters,
        }
    ).encode()
    return head + data, len(head)


def post_body(port, body, header_length=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    conn.request("POST", "/v2/models/pbmc_scvi/infer", body=body, headers=headers)
    r = conn.getresponse()
    answer = r.read()
    conn.close()
    return r.status, json.loads(answer)


def test_a_bad_request_is_refused_at_once_while_the_workers_are_busy(tmp_path, shipped, cells):
    """A request that is wrong before the library's methods (its parameters' names or
    types, its outputs, inputs, shapes, the server's limits, a malformed body) is answered 400
    without waiting for a worker (here the only one is busy with a long request): its answer
    comes before the long request's, and it is the error the worker's code raises for it,
    the first of several faults included. Small JSON bodies (those the dynamic batcher would
    take too) and large binary ones alike."""
    from scvi_onnx.serve.models import Limits, ServedModel
    from scvi_onnx.serve.protocol import parse_request

    x, batch = cells
    server = one_worker_server(tmp_path, "--max-queue", "1", "--max-cells", "150")
    port = server.port
    n_big = 60  # 60 x 2,000 float32: 480 KB, past the 256 KiB decoded on the event loop

    def small(params, outputs, n=5, cols=None, name="counts"):
        doc = doc_for(x[:n, : cols or x.shape[1]], batch[:n], outputs, params)
        doc["inputs"][0]["name"] = name
        return json.dumps(doc).encode(), None

    def big(params, outputs, n=n_big, cols=None, name="counts"):
        return binary_body(x[:n, : cols or x.shape[1]], batch[:n], outputs, params, name)

    requests = []
    for params, outputs, kw in [
        ({"n_samples": 5}, ["latent"], {}),  # unknown parameter
        ({"seed": "one"}, ["elbo"], {}),  # a parameter's type
        ({}, ["latent", "nonsense"], {}),  # unknown output
        ({}, ["latent"], {"cols": 1999}),  # columns
        ({}, ["latent"], {"name": "kounts"}),  # no counts
        ({"seed": 2**70}, ["latent", "nonsense"], {}),  # two faults: the worker's first
    ]:
        requests += [small(params, outputs, **kw), big(params, outputs, **kw)]
    requests += [
        big({}, ["latent"], n=151),  # more than --max-cells
        big({"n_samples": 1}, ["latent"], n=151, cols=1999),
        big({}, ["nonsense"], n=151),
        small({}, ["latent"], n=0),  # no cell (a latent request: batchable otherwise)
    ]
    int8 = json.loads(small({}, ["latent"])[0])  # the batch as INT8: not an obs datatype
    int8["inputs"][1] = {"name": "batch", "datatype": "INT8", "shape": [5], "data": [0] * 5}
    requests.append((json.dumps(int8).encode(), None))
    # the worker's code, in this process
    served = ServedModel("pbmc_scvi", shipped, Limits(max_cells=150))
    wanted = []
    for body, hlen in requests:
        with pytest.raises(Exception) as e:
            served.infer(parse_request(body, hlen))
        wanted.append((400, {"error": str(e.value), "error_type": e.type.__name__}))
    assert "unknown output 'nonsense'" in wanted[10][1]["error"]  # not the seed's
    answers = []
    try:
        with ThreadPoolExecutor(1) as ex:
            slow = ex.submit(post, port, doc_for(x[:150], batch[:150], **LONG))
            wait_for(port, "scvi_onnx_inference_in_flight", 1)
            answers = [post_body(port, body, hlen) for body, hlen in requests]
            assert slow.result()[0] == 200
        assert answers == wanted
        lines = [json.loads(line) for line in server.audit.read_text().splitlines()]
        infer = [r["status"] for r in lines if r["route"] == "infer"]
        # written when answered: the refusals before the long request's 200
        assert infer == [400] * len(answers) + [200]
    finally:
        server.stop()


def request_head(body, header_length=None):
    """The request line and headers of an inference request of ``body``."""
    head = f"POST /v2/models/pbmc_scvi/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
    if header_length is not None:
        head += f"\r\nInference-Header-Content-Length: {header_length}"
    return head.encode() + b"\r\n\r\n"


def post_slowly(port, body, header_length=None, pause=0.5):
    """(status, headers, parsed body) of a request whose body arrives in two halves
    ``pause`` seconds apart."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        half = len(body) // 2
        s.sendall(request_head(body, header_length) + body[:half])
        time.sleep(pause)
        s.sendall(body[half:])
        r = http.client.HTTPResponse(s)
        r.begin()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read())
    finally:
        s.close()


def test_a_request_whose_time_ran_out_before_a_worker_took_it_is_never_computed(tmp_path, cells):
    """--request-timeout counts the queue, the body's reading and its decoding: a request
    whose time is gone before a worker takes it is refused 503 with Retry-After and never
    computed, even with a worker free (before, the free worker took it, computed it for
    nobody, and the client got a 504 after the computation). Here bodies that arrive in two
    halves 0.5 s apart against a 0.2 s limit, on an idle server: a small JSON request and a
    480 KB binary one are refused, the audit log shows no cell computed; a request sent at
    once is then computed (the limit holds for the slow ones only)."""
    x, batch = cells
    server = one_worker_server(tmp_path, "--request-timeout", "0.2")
    port = server.port
    try:
        small = json.dumps(doc_for(x[:5], batch[:5], outputs=["elbo"])).encode()
        for body, hlen in [(small, None), binary_body(x[:60], batch[:60], ["latent"], {})]:
            status, headers, doc = post_slowly(port, body, hlen)
            assert status == 503, doc
            assert "no worker took the request" in doc["error"]
            assert "--request-timeout" in doc["error"]
            assert headers["retry-after"] == "1"
        assert post(port, doc_for(x[:5], batch[:5]))[0] == 200
        lines = [json.loads(line) for line in server.audit.read_text().splitlines()]
        infer = [r for r in lines if r["route"] == "infer"]
        assert [r["status"] for r in infer] == [503, 503, 200]
        assert [r.get("n_cells") for r in infer] == [None, None, 5]
    finally:
        server.stop()


def send_raw(port, doc, tls=None, header_length=None):
    """A request sent on a socket that the test closes itself, without reading the answer
    (``doc``: a JSON document, or a body's bytes with ``header_length`` for a binary one;
    ``tls``: an ssl context for an HTTPS server)."""
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="127.0.0.1")
    s.sendall(request_head(body, header_length) + body)
    return s


def test_client_disconnecting_mid_request(busy_server, shipped, query, cells):
    """A client that closes its connection while its request is computed: the audit log says
    499, the slot is freed when the computation ends, and the next request is served."""
    x, batch = cells
    port = busy_server.port
    s = send_raw(port, doc_for(x[:50], batch[:50], **LONG))
    wait_for(port, "scvi_onnx_inference_in_flight", 1)
    s.close()
    wait_for(port, "scvi_onnx_inference_in_flight", 0)
    status, _, data = post(port, doc_for(x[:3], batch[:3]))
    assert status == 200
    got = np.array(json.loads(data)["outputs"][0]["data"], np.float32).reshape(3, 10)
    np.testing.assert_array_equal(got, shipped.get_latent_representation(query[:3]))
    lines = [json.loads(line) for line in busy_server.audit.read_text().splitlines()]
    infer = [r for r in lines if r["route"] == "infer"]
    assert [r["status"] for r in infer] == [499, 200]


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_client_leaving_the_queue_is_not_computed(busy_server, cells, batched):
    """A queued request whose client goes away is answered 499 at once (in the audit log
    before the request ahead of it ends) and its cells are never computed: on the
    single-request path it leaves the queue; a small latent request, queued in the dynamic
    batcher, is left out of the batch."""
    x, batch = cells
    port = busy_server.port
    queued = doc_for(x[:3], batch[:3]) if batched else doc_for(x[:50], batch[:50], **SLOW)
    with ThreadPoolExecutor(1) as ex:
        slow = ex.submit(post, port, doc_for(x, batch, **LONG))
        wait_for(port, "scvi_onnx_inference_in_flight", 1)
        s = send_raw(port, queued)
        wait_for(port, "scvi_onnx_inference_queued", 1)
        s.close()
        if not batched:  # the batcher counts its requests queued until it takes them
            wait_for(port, "scvi_onnx_inference_queued", 0)
        assert slow.result()[0] == 200
    wait_for(port, "scvi_onnx_inference_in_flight", 0)
    wait_for(port, "scvi_onnx_inference_queued", 0)
    lines = [json.loads(line) for line in busy_server.audit.read_text().splitlines()]
    infer = [r for r in lines if r["route"] == "infer"]
    # written when answered: with one worker, a request computed after the slow one would
    # come after it
    assert [(r["status"], r.get("n_cells")) for r in infer] == [(499, None), (200, len(x))]
    text = gauge(port, "scvi_onnx_inference_in_flight")[1]
    assert re.search(rf"^scvi_onnx_cells_total{{[^}}]*}} {len(x)}(\.0)?$", text, re.M)
    assert gauge(port, "scvi_onnx_batches_total")[0] == 0


def test_client_leaving_while_its_request_is_decoded_is_not_computed(busy_server, cells):
    """A binary request that arrives while every worker is busy is decoded and checked on a
    decoding thread as it waits; its client closes the connection as soon as the body is
    sent, while that decoding runs or just after: 499 in the audit log before the request
    ahead of it ends, its cells never computed, and the server serves on."""
    x, batch = cells
    port = busy_server.port
    body, hlen = binary_body(np.tile(x, (4, 1)), batch * 4, ["elbo"], {})  # ~3 MB
    with ThreadPoolExecutor(1) as ex:
        slow = ex.submit(post, port, doc_for(x, batch, **LONG))
        wait_for(port, "scvi_onnx_inference_in_flight", 1)
        send_raw(port, body, header_length=hlen).close()
        end = time.monotonic() + 120
        while '"status":499' not in busy_server.audit.read_text():
            assert time.monotonic() < end, "the request of the client that left was not answered"
            time.sleep(0.02)
        assert slow.result()[0] == 200
    wait_for(port, "scvi_onnx_inference_in_flight", 0)
    assert post(port, doc_for(x[:3], batch[:3]))[0] == 200
    infer = [
        r
        for r in map(json.loads, busy_server.audit.read_text().splitlines())
        if r["route"] == "infer"
    ]
    assert [(r["status"], r.get("n_cells")) for r in infer] == [
        (499, None),
        (200, len(x)),
        (200, 3),
    ]
    text = gauge(port, "scvi_onnx_inference_in_flight")[1]
    assert re.search(rf"^scvi_onnx_cells_total{{[^}}]*}} {len(x) + 3}(\.0)?$", text, re.M)


def test_request_timeout_is_504_and_a_timed_out_queued_request_is_not_computed(tmp_path, cells):
    """--request-timeout counts the queue: a computation past it is answered 504 (and keeps
    its worker until it ends); a small latent request queued for the dynamic batcher behind
    it is answered 504 too and left out of any batch; then the server serves again."""
    x, batch = cells
    s = one_worker_server(tmp_path, "--request-timeout", "0.2")
    try:
        port = s.port
        with ThreadPoolExecutor(2) as ex:
            slow = ex.submit(post, port, doc_for(x, batch, **LONG))  # far past 0.2 s
            wait_for(port, "scvi_onnx_inference_in_flight", 1)
            queued = ex.submit(post, port, doc_for(x[:3], batch[:3]))
            for status, _, body in (slow.result(), queued.result()):
                assert status == 504
                assert "--request-timeout" in json.loads(body)["error"]
        wait_for(port, "scvi_onnx_inference_in_flight", 0)
        status, _, data = post(port, doc_for(x[:3], batch[:3]))
        assert status == 200
        assert gauge(port, "scvi_onnx_batches_total")[0] == 1  # the last request's alone
        infer = [
            r for r in map(json.loads, s.audit.read_text().splitlines()) if r["route"] == "infer"
        ]
        assert [(r["status"], r["error"]) for r in infer] == [
            (504, "Timeout"),
            (504, "Timeout"),
            (200, None),
        ]
    finally:
        s.stop()


def test_sigterm_drains_in_flight_requests(busy_server, shipped, query, cells):
    x, batch = cells
    port = busy_server.port
    with ThreadPoolExecutor(1) as ex:
        slow = ex.submit(post, port, doc_for(x[:50], batch[:50], **SLOW))
        wait_for(port, "scvi_onnx_inference_in_flight", 1)
        busy_server.proc.send_signal(subprocess.signal.SIGTERM)
        status, _, body = slow.result()
    assert status == 200
    got = np.array(json.loads(body)["outputs"][0]["data"], np.float64)
    np.testing.assert_array_equal(
        got, shipped.get_marginal_ll(query[:50], return_mean=False, n_mc_samples=500)
    )
    assert busy_server.wait_exit(60) == 0
    assert any("draining" in line for line in busy_server.lines)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_audit_log_records_requests_never_data(server, query, cells, shipped):
    x, batch = cells
    before = server.audit.read_text().splitlines()
    post(server.port, doc_for(x[:7], batch[:7], outputs=("latent", "elbo")), token=server.token)
    post(server.port, doc_for(x[:2], ["nowhere", "pbmc_5k"], ("elbo",)), token=server.token)
    post(server.port, doc_for(x[:2], batch[:2]))  # no token
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/v2/health/live")  # health checks are not audited
    conn.getresponse().read()
    auth = {"Authorization": f"Bearer {server.token}"}
    conn.request("GET", "/v2/models/no_such_model", headers=auth)
    conn.getresponse().read()  # an unknown model: 404, its error named too (it was null)
    conn.close()
    lines = server.audit.read_text().splitlines()
    new = [json.loads(line) for line in lines[len(before) :]]
    assert [r["status"] for r in new] == [200, 400, 401, 404]
    assert new[3]["error"] == "NotFound"
    new = new[:3]
    keys = {
        "time", "request_id", "client", "method", "route", "model", "version",
        "outputs", "n_cells", "status", "error", "duration_ms", "worker",
    }  # fmt: skip
    for r in new:
        assert set(r) == keys and r["worker"] is None  # one process
        assert r["client"].startswith("127.0.0.1:") and len(r["request_id"]) == 32
    ok, bad, unauth = new
    assert ok["route"] == "infer" and ok["model"] == "pbmc_scvi" and ok["n_cells"] == 7
    assert ok["outputs"] == ["latent", "elbo"] and ok["version"] == shipped.digest[7:19]
    assert bad["error"] == "UnknownCategoryError" and unauth["error"] == "Unauthorized"
    # never a count, a gene, a category value or a cell name
    text = "\n".join(lines)
    for word in ("nowhere", "pbmc_5k", "MALAT1", "cell 0", query.obs_names[0]):
        assert word not in text
    assert not re.search(r"\d+\.\d{4,}", text.replace(str(ok["duration_ms"]), ""))


@pytest.fixture()
def tls_cert(tmp_path):
    """A self-signed certificate for 127.0.0.1 / localhost: (cert, key) paths."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("workers", [1, 2])
def test_tls(tmp_path, shipped, query, workers, tls_cert):
    cert, key = tls_cert
    s = ServerProcess(
        [str(SHIPPED), "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key)]
        + ["--workers", str(workers)]
    )
    try:
        assert s.url.startswith("https://")
        # with 2 workers: 2 requests in flight, the handshakes made by the workers
        remote = scvi_onnx.connect(f"{s.url}/v2/models/pbmc_scvi", cafile=str(cert), chunk_cells=2)
        assert remote.concurrency == workers
        np.testing.assert_array_equal(
            remote.get_latent_representation(query[:6]),
            shipped.get_latent_representation(query[:6]),
        )
        ctx = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", s.port, context=ctx, timeout=30)
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
        # clients that leave idle TLS connections open hold the drain up to the TLS close
        # handshake's timeout (30 s); these close theirs
        conn.close()
        remote.close()
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_tls_client_leaving_mid_request(tmp_path, cells, workers, tls_cert):
    """A client that closes its TLS connection while its request is computed is noticed (499
    in the audit log) before the computation ends, in the supervisor's worker processes too."""
    cert, key = tls_cert
    x, batch = cells
    s = one_worker_server(
        tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--workers", str(workers)
    )
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        conn = send_raw(s.port, doc_for(x[:100], batch[:100], **LONG), tls=ctx)
        wait_for(s.port, "scvi_onnx_inference_in_flight", 1, tls=ctx)
        conn.close()
        infer = []
        while not infer:  # the audit line is written when the request is answered
            time.sleep(0.02)
            lines = s.audit.read_text().splitlines()
            infer = [r for r in map(json.loads, lines) if r["route"] == "infer"]
        assert [(r["status"], r["error"]) for r in infer] == [(499, "ClientDisconnect")]
        # answered while its computation still runs (another worker process may show the
        # gauges a quarter of a second late: wait for it, not read it once)
        wait_for(s.port, "scvi_onnx_inference_in_flight", 1, tls=ctx, timeout=10)
        wait_for(s.port, "scvi_onnx_inference_in_flight", 0, tls=ctx)
    finally:
        assert s.stop() == 0


def test_dynamic_batching_gives_each_request_its_own_numbers(shipped, query, cells):
    """Small latent requests waiting for a worker are computed together in one library call;
    each gets exactly the library's numbers for its cells, and one request's bad cell is
    reported to that request alone (the batch is then run request by request)."""
    x, batch = cells
    s = ServerProcess(
        [
            str(SHIPPED),
            "--port",
            "0",
            "--device",
            "cpu",
            "--max-concurrency",
            "1",
            "--max-queue",
            "32",
        ]
    )
    try:
        port = s.port
        bad = x[7:8].copy()
        bad[0, 3] = np.nan
        with ThreadPoolExecutor(12) as ex:
            slow = ex.submit(post, port, doc_for(x[:100], batch[:100], **LONG))
            wait_for(port, "scvi_onnx_inference_in_flight", 1)
            small = [
                ex.submit(post, port, doc_for(x[i : i + 2], batch[i : i + 2]))
                for i in range(0, 20, 2)
            ]
            wrong = ex.submit(post, port, doc_for(bad, batch[7:8]))
            wait_for(port, "scvi_onnx_inference_queued", 11)
            assert slow.result()[0] == 200
            for i, f in zip(range(0, 20, 2), small, strict=True):
                status, _, data = f.result()
                assert status == 200
                got = np.array(json.loads(data)["outputs"][0]["data"], np.float32).reshape(2, 10)
                np.testing.assert_array_equal(
                    got, shipped.get_latent_representation(query[i : i + 2])
                )
            status, _, data = wrong.result()
            assert status == 400 and "NaN" in json.loads(data)["error"]
            assert "cell 0" in json.loads(data)["error"]
        batches = gauge(port, "scvi_onnx_batches_total")[0]
        batched = gauge(port, "scvi_onnx_batched_requests_total")[0]
        assert batched == 11 and batches < batched
    finally:
        assert s.stop() == 0
