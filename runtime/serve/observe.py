"""What a server tells its operators: the audit log (JSON lines) and Prometheus metrics.

Both record what happened to a request, never what it carried: no count, no gene value, no cell
name, no request body. Both are written from the event loop's thread only, so they need no lock.

A server of several worker processes (``serve --workers N``) shares one audit log (each line is
one ``write`` to a file opened with ``O_APPEND``: lines of different processes never mix) and
sums its metrics: each process writes its :meth:`Metrics.state` to a private folder when it
changes, at most four times a second (:class:`SharedMetrics`), and ``/metrics``, whichever
process answers, adds the others' latest to its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any

logger = logging.getLogger("scvi_onnx.serve")

#: Upper bounds (seconds) of the request-latency histogram's buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class RequestRecord:
    """One request, as the audit log and the metrics see it."""

    request_id: str
    client: str
    method: str
    route: str
    start: float = field(default_factory=time.perf_counter)
    wall: float = field(default_factory=time.time)
    model: str | None = None
    version: str | None = None
    outputs: list[str] | None = None
    n_cells: int | None = None
    status: int = 0
    error: str | None = None  # the error's class (never its message: it may quote values)
    worker: int | None = None  # the worker process that answered (serve --workers N)

    def duration(self) -> float:
        return time.perf_counter() - self.start


class AuditLog:
    """One JSON line per request, appended to ``path`` (opened once, flushed each line).

    Fields: ``time`` (UTC, ISO 8601), ``request_id``, ``client`` (address), ``method``,
    ``route``, ``model``, ``version``, ``outputs``, ``n_cells``, ``status``, ``error`` (the
    error's kind), ``duration_ms``, ``worker`` (which worker process answered, with
    ``serve --workers N``; else null).
    """

    def __init__(self, path: str | os.PathLike):
        # created owner-only: the log says who asked what, when
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file: IO[str] = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def write(self, rec: RequestRecord) -> None:
        line = {
            "time": datetime.fromtimestamp(rec.wall, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "request_id": rec.request_id,
            "client": rec.client,
            "method": rec.method,
            "route": rec.route,
            "model": rec.model,
            "version": rec.version,
            "outputs": rec.outputs,
            "n_cells": rec.n_cells,
            "status": rec.status,
            "error": rec.error,
            "duration_ms": round(rec.duration() * 1e3, 3),
            "worker": rec.worker,
        }
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


def _labels(**kv: Any) -> str:
    def esc(v: Any) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in kv.items()) + "}"


class Metrics:
    """Counters and a latency histogram in the Prometheus text exposition format (0.0.4)."""

    def __init__(self) -> None:
        self.requests: dict[tuple, int] = defaultdict(int)  # (route, model, code)
        self.errors: dict[tuple, int] = defaultdict(int)  # (route, model, code)
        self.cells: dict[tuple, int] = defaultdict(int)  # (model, version)
        self.hist: dict[tuple, list[float]] = {}  # (route, model) -> bucket counts + sum
        self.in_flight = 0
        self.queued = 0
        self.batches = 0
        self.batched_requests = 0
        self.started = time.time()

    def observe(self, rec: RequestRecord) -> None:
        model = rec.model or ""
        self.requests[(rec.route, model, rec.status)] += 1
        if rec.status >= 400:
            self.errors[(rec.route, model, rec.status)] += 1
        if rec.n_cells and rec.status == 200:
            self.cells[(model, rec.version or "")] += rec.n_cells
        h = self.hist.setdefault((rec.route, model), [0.0] * (len(LATENCY_BUCKETS) + 2))
        d = rec.duration()
        for i, b in enumerate(LATENCY_BUCKETS):
            if d <= b:
                h[i] += 1
        h[-2] += 1  # +Inf (the count)
        h[-1] += d  # the sum

    def state(self) -> dict[str, Any]:
        """Everything :meth:`render` shows, as JSON-ready lists (another worker process of the
        same server adds it to its own: :meth:`combined`)."""
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "errors": [[*k, v] for k, v in self.errors.items()],
            "cells": [[*k, v] for k, v in self.cells.items()],
            "hist": [[*k, h] for k, h in self.hist.items()],
            "in_flight": self.in_flight,
            "queued": self.queued,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "started": self.started,
        }

    def combined(self, others: list[dict[str, Any]]) -> Metrics:
        """These metrics plus the :meth:`state` of other worker processes: counters and
        histograms summed, gauges summed, the earliest start."""
        m = Metrics()
        m.started = self.started
        for s in [self.state(), *others]:
            for key in ("requests", "errors", "cells"):
                table = getattr(m, key)
                for *k, v in s[key]:
                    table[tuple(k)] += v
            for *k, h in s["hist"]:
                mine = m.hist.setdefault(tuple(k), [0.0] * (len(LATENCY_BUCKETS) + 2))
                for i, v in enumerate(h):
                    mine[i] += v
            m.in_flight += s["in_flight"]
            m.queued += s["queued"]
            m.batches += s["batches"]
            m.batched_requests += s["batched_requests"]
            m.started = min(m.started, s["started"])
        return m

    def render(self, models: list[tuple[str, str, bool]]) -> str:
        """The exposition text; ``models``: (name, version, ready)."""
        out = []

        def metric(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        metric("scvi_onnx_requests_total", "counter", "HTTP requests by route, model and status.")
        for (route, model, code), v in sorted(self.requests.items()):
            out.append(
                f"scvi_onnx_requests_total{_labels(route=route, model=model, code=code)} {v}"
            )
        metric(
            "scvi_onnx_request_errors_total",
            "counter",
            "Requests answered with a 4xx or 5xx status, by route, model and status.",
        )
        for (route, model, code), v in sorted(self.errors.items()):
            labels = _labels(route=route, model=model, code=code)
            out.append(f"scvi_onnx_request_errors_total{labels} {v}")
        metric(
            "scvi_onnx_cells_total", "counter", "Cells in successful inference requests, by model."
        )
        for (model, version), v in sorted(self.cells.items()):
            out.append(f"scvi_onnx_cells_total{_labels(model=model, version=version)} {v}")
        metric(
            "scvi_onnx_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response, by route and model.",
        )
        for (route, model), h in sorted(self.hist.items()):
            for b, c in zip(LATENCY_BUCKETS, h, strict=False):
                labels = _labels(route=route, model=model, le=repr(b))
                out.append(f"scvi_onnx_request_duration_seconds_bucket{labels} {int(c)}")
            labels = _labels(route=route, model=model, le="+Inf")
            out.append(f"scvi_onnx_request_duration_seconds_bucket{labels} {int(h[-2])}")
            labels = _labels(route=route, model=model)
            out.append(f"scvi_onnx_request_duration_seconds_count{labels} {int(h[-2])}")
            out.append(f"scvi_onnx_request_duration_seconds_sum{labels} {h[-1]:.6f}")
        metric("scvi_onnx_inference_in_flight", "gauge", "Inference requests being computed.")
        out.append(f"scvi_onnx_inference_in_flight {self.in_flight}")
        metric("scvi_onnx_inference_queued", "gauge", "Inference requests waiting for a slot.")
        out.append(f"scvi_onnx_inference_queued {self.queued}")
        metric(
            "scvi_onnx_batches_total",
            "counter",
            "Library calls that computed concurrent small requests together.",
        )
        out.append(f"scvi_onnx_batches_total {self.batches}")
        metric("scvi_onnx_batched_requests_total", "counter", "Requests computed in those calls.")
        out.append(f"scvi_onnx_batched_requests_total {self.batched_requests}")
        metric("scvi_onnx_model_ready", "gauge", "1 when the model is loaded and verified.")
        for name, version, ready in models:
            out.append(f"scvi_onnx_model_ready{_labels(model=name, version=version)} {int(ready)}")
        metric("scvi_onnx_start_time_seconds", "gauge", "Unix time the server started.")
        out.append(f"scvi_onnx_start_time_seconds {self.started:.3f}")
        return "\n".join(out) + "\n"


class SharedMetrics:
    """One worker process's part in a multi-process server's metrics: its latest
    :meth:`Metrics.state` in ``folder/worker-<index>.json`` (replaced atomically when they
    change, at most every :attr:`INTERVAL_S`, the last change of a burst included), and the
    others' read back."""

    INTERVAL_S = 0.25

    def __init__(self, folder: str | os.PathLike, index: int):
        self.folder = os.fspath(folder)
        self.index = index
        self.path = os.path.join(self.folder, f"worker-{index}.json")
        self._last = 0.0
        self._pending = False

    def changed(self, metrics: Metrics, loop: Any) -> None:
        """Metrics changed (on the event loop): write now, or once the interval is over (what
        the others show of this worker is then at most that old)."""
        if self._pending:
            return
        wait = self._last + self.INTERVAL_S - time.monotonic()
        if wait <= 0:
            self.write(metrics)
        else:
            self._pending = True
            loop.call_later(wait, self._write_pending, metrics)

    def _write_pending(self, metrics: Metrics) -> None:
        self._pending = False
        self.write(metrics)

    def write(self, metrics: Metrics) -> None:
        self._last = time.monotonic()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(metrics.state(), f, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError as e:  # the metrics are not worth a failed request
            logger.warning("cannot share this worker's metrics (%s)", e)

    def others(self) -> list[dict[str, Any]]:
        """The latest state of every other worker process (unreadable ones left out)."""
        out = []
        try:
            names = os.listdir(self.folder)
        except OSError:
            return out
        for name in sorted(names):
            if not (name.startswith("worker-") and name.endswith(".json")):
                continue
            if name == os.path.basename(self.path):
                continue
            try:
                with open(os.path.join(self.folder, name), encoding="utf-8") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
        return out
