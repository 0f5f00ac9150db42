"""Real servers for the serving tests: ``python -m scvi_onnx serve`` subprocesses on free
loopback ports (``--port 0``; the port is read from the server's "listening on" line), the
shipped SCVI bundle and a tiny SCANVI (batch, a categorical and a continuous covariate)
trained and exported here."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from ..conftest import require

require("starlette")
require("uvicorn")

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "pbmc_scvi"
QUERY = ROOT / "models" / "example" / "pbmc_query.h5ad"
TRAIN = ROOT / "models" / "example" / "pbmc_train.h5ad"
LISTENING = re.compile(r"listening on (https?)://([^\s:]+|\[[^\]]+\]):(\d+)")


class ServerProcess:
    """A ``scvi-onnx serve`` subprocess; its stderr is collected on a thread."""

    def __init__(self, args: list[str], *, wait: bool = True, timeout: float = 120.0):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scvi_onnx", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.url = None
        self.port = None
        threading.Thread(target=self._pump, daemon=True).start()
        if wait:
            self.wait_listening(timeout)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = LISTENING.search(line)
            if m and self.url is None:
                self.port = int(m.group(3))
                self.url = f"{m.group(1)}://127.0.0.1:{self.port}"
                self._listening.set()
        self._listening.set()

    def wait_listening(self, timeout: float) -> None:
        if not self._listening.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_exit(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.05)  # let the pump thread read the last lines
        return rc

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="session")
def query():
    import anndata as ad

    return ad.read_h5ad(QUERY)


@pytest.fixture(scope="session")
def cells(shipped, query):
    """The query cells as the shipped model's dense counts, and their batches."""
    return np.asarray(query[:, list(shipped.genes)].X.todense(), np.float32), list(
        query.obs["batch"]
    )


@pytest.fixture(scope="session")
def shipped():
    import scvi_onnx

    return scvi_onnx.load(SHIPPED, device="cpu")


@pytest.fixture(scope="session")
def scanvi_bundle(tmp_path_factory):
    """A 1-epoch SCANVI on 120 genes of the real PBMC training cells: batch, labels (with
    unlabeled cells), a categorical covariate and a continuous one; and query cells for it."""
    require("torch")
    scvi = require("scvi")
    import anndata as ad

    from scvi_onnx.exporter import export_model
    from scvi_onnx.exporter.parity import QUIET_TRAINING

    a = ad.read_h5ad(TRAIN)
    top = np.argsort(-np.asarray(a.X.sum(0)).ravel(), kind="stable")[:120]
    a = a[:, np.sort(top)].copy()
    a = a[np.asarray(a.X.sum(1)).ravel() > 0].copy()
    rng = np.random.default_rng(0)
    a.obs["donor"] = np.array(["d1", "d2", "d3"])[rng.integers(0, 3, a.n_obs)]
    a.obs["pct"] = rng.normal(size=a.n_obs).astype(np.float32)
    cell_type = np.array(["T", "B", "NK"])[rng.integers(0, 3, a.n_obs)]
    cell_type[rng.random(a.n_obs) < 0.3] = "Unknown"
    a.obs["cell_type"] = cell_type
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCANVI.setup_anndata(
            a,
            batch_key="batch",
            labels_key="cell_type",
            unlabeled_category="Unknown",
            categorical_covariate_keys=["donor"],
            continuous_covariate_keys=["pct"],
        )
        m = scvi.model.SCANVI(a, n_hidden=16, n_latent=4)
        m.train(max_epochs=1, **QUIET_TRAINING)
    path = export_model(m, tmp_path_factory.mktemp("scanvi") / "scanvi_cov")
    q = a[:90].copy()
    del q.obs["cell_type"]  # query cells come without labels
    return path, q


@pytest.fixture(scope="session")
def scanvi(scanvi_bundle):
    import scvi_onnx

    return scvi_onnx.load(scanvi_bundle[0], device="cpu")


@pytest.fixture(scope="session")
def token(tmp_path_factory):
    value = secrets.token_urlsafe(24)
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value, path


@pytest.fixture(scope="session")
def server(scanvi_bundle, token, tmp_path_factory):
    """The main server: the shipped SCVI and the SCANVI, token required, audit log on, a
    4 MiB body limit and 300 cells per request."""
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    s = ServerProcess(
        [
            str(SHIPPED),
            "--name",
            f"scanvi={scanvi_bundle[0]}",
            "--token-file",
            str(token[1]),
            "--audit-log",
            str(audit),
            "--max-request-bytes",
            "4MiB",
            "--max-cells",
            "300",
            "--device",
            "cpu",
            "--port",
            "0",
        ]
    )
    s.audit = audit
    s.token = token[0]
    yield s
    s.stop()


@pytest.fixture()
def tampered_bundle(tmp_path):
    dst = tmp_path / "tampered"
    shutil.copytree(SHIPPED, dst)
    return dst
