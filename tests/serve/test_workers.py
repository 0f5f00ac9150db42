"""``serve --workers N``: several server processes behind one port, on real servers. Connections
are handed to the workers in turn; every worker gives the library's numbers; metrics are summed
over them; a killed worker is replaced; SIGTERM drains them all; a bad bundle stops the start."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import scvi_onnx

from ..conftest import require
from .conftest import SHIPPED, ServerProcess
from .test_load import doc_for, post

tc = require("tritonclient.http")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc for the workers")


@pytest.fixture()
def workers_server(tmp_path):
    audit = tmp_path / "audit.jsonl"
    s = ServerProcess(
        [str(SHIPPED), "--port", "0", "--device", "cpu", "--workers", "2"]
        + ["--audit-log", str(audit)]
    )
    s.audit = audit
    yield s
    s.stop()


def audit_lines(server) -> list[dict]:
    return [json.loads(line) for line in server.audit.read_text().splitlines()]


def worker_pids(server) -> list[int]:
    """The supervisor's worker processes (its spawned children, not multiprocessing's
    resource tracker)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server.proc.pid and b"spawn_main" in cmd:
            pids.append(int(d.name))
    return sorted(pids)


def infer_count(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    m = re.search(r'^scvi_onnx_requests_total\{route="infer",model="pbmc_scvi",code="200"\} (\S+)$',
                  text, re.M)  # fmt: skip
    return float(m.group(1)) if m else 0.0


def wait_until(check, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("the server never reached the state waited for")


def binary_latent(client, x, batch):
    inputs = [
        tc.InferInput("counts", list(x.shape), "FP32"),
        tc.InferInput("batch", [len(batch)], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    inputs[1].set_data_from_numpy(np.asarray(batch, dtype=object), binary_data=True)
    out = [tc.InferRequestedOutput("latent", binary_data=True)]
    return client.infer("pbmc_scvi", inputs, outputs=out).as_numpy("latent")


def test_connections_go_to_every_worker_with_the_library_numbers(
    workers_server, shipped, query, cells
):
    s = workers_server
    x, batch = cells
    assert any("2 worker processes" in line for line in s.lines)
    assert len(worker_pids(s)) == 2
    clients = [tc.InferenceServerClient(s.host) for _ in range(4)]  # a connection each

    def run(i: int) -> None:  # each client 3 requests, all four clients at once
        for k in range(3):
            rows = slice(30 * i + 10 * k, 30 * i + 10 * k + 10)
            np.testing.assert_array_equal(
                binary_latent(clients[i], x[rows], batch[rows]),
                shipped.get_latent_representation(query[rows]),
            )

    try:
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(run, range(4)))
    finally:
        for client in clients:
            client.close()
    infer = [r for r in audit_lines(s) if r["route"] == "infer"]
    assert len(infer) == 12 and {r["worker"] for r in infer} == {0, 1}
    # /metrics, whichever worker answers it, counts the requests of both
    wait_until(lambda: infer_count(s.port) == 12)
    assert s.stop() == 0
    assert any("stopped" in line for line in s.lines)


def test_the_library_client_keeps_every_worker_busy(workers_server, shipped, query):
    """``connect`` reads the server's worker processes from its metadata and keeps that many
    requests in flight: both workers answer, the numbers are the local model's."""
    s = workers_server
    with scvi_onnx.connect(s.url, chunk_cells=40) as remote:
        assert remote.concurrency == 2
        np.testing.assert_array_equal(
            remote.get_latent_representation(query), shipped.get_latent_representation(query)
        )
    infer = [r for r in audit_lines(s) if r["route"] == "infer"]
    assert len(infer) == -(-query.n_obs // 40) and {r["worker"] for r in infer} == {0, 1}


def test_a_killed_worker_is_replaced(workers_server, shipped, query, cells):
    s = workers_server
    x, batch = cells
    victim = worker_pids(s)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: any("is ready" in line for line in s.lines), timeout=120)
    assert any(f"pid {victim}) exited with code -9" in line for line in s.lines)
    assert len(worker_pids(s)) == 2 and victim not in worker_pids(s)
    before = len(audit_lines(s))
    for i in range(4):  # a new connection each: both workers again
        status, _, body = post(s.port, doc_for(x[i : i + 3], batch[i : i + 3]))
        assert status == 200
        got = np.array(json.loads(body)["outputs"][0]["data"], np.float32).reshape(3, -1)
        np.testing.assert_array_equal(got, shipped.get_latent_representation(query[i : i + 3]))
    assert {r["worker"] for r in audit_lines(s)[before:]} == {0, 1}


def test_sigterm_drains_every_worker(workers_server, shipped, query, cells):
    s = workers_server
    x, batch = cells
    slow = {"outputs": ["marginal_ll"], "parameters": {"n_mc_samples": 2000}}

    def busy() -> bool:  # both requests in a worker, computing or waiting for a slot
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        gauges = [
            float(re.search(rf"^scvi_onnx_inference_{g} (\S+)$", text, re.M).group(1))
            for g in ("in_flight", "queued")
        ]
        return sum(gauges) == 2

    with ThreadPoolExecutor(2) as ex:
        futures = [
            ex.submit(post, s.port, doc_for(x[:60], batch[:60], **slow)),
            ex.submit(post, s.port, doc_for(x[60:120], batch[60:120], **slow)),
        ]
        wait_until(busy)
        s.proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    for (status, _, body), rows in zip(results, (slice(0, 60), slice(60, 120)), strict=True):
        assert status == 200
        np.testing.assert_array_equal(
            np.array(json.loads(body)["outputs"][0]["data"], np.float64),
            shipped.get_marginal_ll(query[rows], return_mean=False, n_mc_samples=2000),
        )
    assert s.wait_exit(120) == 0
    assert any("draining" in line for line in s.lines)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=5).close()


def test_a_tampered_bundle_stops_the_start(tampered_bundle):
    weights = sorted(tampered_bundle.glob("*.onnx"))[0]
    with open(weights, "ab") as f:
        f.write(b"x")
    s = ServerProcess(
        [str(tampered_bundle), "--port", "0", "--device", "cpu", "--workers", "2"], wait=False
    )
    assert s.wait_exit(120) != 0
    assert s.url is None  # it never said it listens
    errors = [line for line in s.lines if line.strip()]
    assert len(errors) == 1 and weights.name in errors[0], errors
