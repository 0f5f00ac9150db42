"""Benchmark of ``scvi-onnx serve`` on loopback, binary tensor data, the shipped bundle.

    python benchmarks/serve.py                    # the README's table
    python benchmarks/serve.py --quick            # fewer requests, while developing

The load tool is a bounded asyncio client (aiohttp, which ``tritonclient[http]`` installs):
a fixed number of requests in flight over keep-alive connections, request bodies encoded once
beforehand, so the client costs little of the machine's two cores. Measured:

1. single-cell latent requests at concurrency 1, 8 and 32: requests/s, p50 and p99 latency;
2. 1,000-cell latent requests at concurrency 1, 2 and 4: cells/s, against the library called
   in-process on the same cells (same process kind, same threads; a round right before and
   one right after each load, side by side), with the counts as FP32
   and in the narrowest integer datatype that holds them (what ``scvi_onnx.connect`` sends:
   UINT16 here); on the default server and on one of 2 worker processes (``--workers 2``);
3. ELBO and marginal-LL requests of 100 cells: latency;
4. the server's RSS over 10,000 single-cell requests (every 1,000).

Cells are real PBMC cells (the example data, drawn with replacement). The server runs as a
subprocess (``python -m scvi_onnx serve``) with its defaults (and ``--workers 2`` for the
second set of 1,000-cell rows). Prints a Markdown table and
writes the numbers as JSON to ``benchmarks/results/serve-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "pbmc_scvi"
HEADER = "Inference-Header-Content-Length"


def cells(n: int, seed: int = 0):
    import anndata as ad

    from scvi_onnx.bundle import read_manifest

    a = ad.concat(
        [
            ad.read_h5ad(ROOT / "models/example/pbmc_train.h5ad"),
            ad.read_h5ad(ROOT / "models/example/pbmc_query.h5ad"),
        ],
        index_unique="-",
    )
    genes = list(read_manifest(BUNDLE, check_files=False).genes)
    a = a[:, genes]
    rows = np.random.default_rng(seed).integers(0, a.n_obs, n)
    x = np.asarray(a.X[rows].todense(), dtype=np.float32)
    batch = a.obs["batch"].astype(str).to_numpy()[rows]
    return x, batch, genes


def body(x, batch, outputs, parameters=None, datatype="FP32"):
    """A binary request, the counts ``x`` sent as ``datatype``."""
    from scvi_onnx.serve.client import _binary_request

    return _binary_request(
        [("counts", datatype, x), ("batch", "BYTES", np.asarray(batch, dtype=object))],
        outputs,
        parameters or {},
    )


class Server:
    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scvi_onnx", "serve", str(BUNDLE), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.port = None
        for line in self.proc.stdout:
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            raise RuntimeError("server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server so far (all its threads, and its worker
        processes with ``--workers``)."""
        total = 0.0
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


async def load(port: int, bodies: list, n: int, concurrency: int, warmup: int = 50):
    """n requests (cycling over bodies) with at most ``concurrency`` in flight: (req/s,
    latencies in ms)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v2/models/pbmc_scvi/infer"
    timeout = aiohttp.ClientTimeout(total=600)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        lat: list[float] = []
        next_i = 0

        async def worker(count: int, record: bool):
            nonlocal next_i
            while True:
                i = next_i
                if i >= count:
                    return
                next_i += 1
                data, hlen = bodies[i % len(bodies)]
                t = time.perf_counter()
                async with s.post(url, data=data, headers={HEADER: str(hlen)}) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")
                if record:
                    lat.append((time.perf_counter() - t) * 1e3)

        await asyncio.gather(*[worker(warmup, False) for _ in range(concurrency)])
        next_i = 0
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(n, True) for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0
    return n / elapsed, np.array(lat)


def big_latent(server: Server, big: list, workers: int, q: float, in_process) -> list[tuple]:
    """The 1,000-cell latent requests at concurrency 1, 2 and 4 (each client its own
    keep-alive connection), each load between two rounds of the library in-process on the
    same cells (side by side: this shared machine's speed drifts by +-30% over minutes):
    (workers, datatype, body bytes, concurrency, cells/s, p50 ms, server CPU ms per request,
    in-process cells/s (the mean of the two rounds), in-process CPU ms per 1,000 cells)."""
    rows = []
    for dt, request in big:
        for c in (1, 2, 4):
            n = max(8, int(60 * q))
            before = in_process()
            cpu0 = server.cpu_s()
            rps, lat = asyncio.run(load(server.port, [request], n, c, warmup=2 * c))
            cpu_ms = (server.cpu_s() - cpu0) / (n + 2 * c) * 1e3
            after = in_process()
            ref = (before[0] + after[0]) / 2
            ref_cpu = (before[1] + after[1]) / 2
            p50 = np.percentile(lat, 50)
            rows.append((workers, dt, len(request[0]), c, rps * 1000, p50, cpu_ms, ref, ref_cpu))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (development)")
    ap.add_argument("--server-args", default="", help="extra `serve` options, e.g. '--threads 2'")
    ap.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=[2],
        help="also time the 1,000-cell requests on servers of this many worker processes",
    )
    args = ap.parse_args()
    q = 0.2 if args.quick else 1.0
    import scvi_onnx

    results: dict = {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(),
        },
        "client": "bounded asyncio client (aiohttp), binary tensor data, keep-alive",
    }
    x_all, batch_all, _ = cells(1100)
    single = [body(x_all[i : i + 1], batch_all[i : i + 1], ["latent"]) for i in range(200)]
    from scvi_onnx.serve.client import _counts_tensor

    # the 1,000 cells' request with FP32 counts, and as scvi_onnx.connect sends them
    narrow_dt, narrow_x = _counts_tensor(x_all[:1000])
    big = [
        ("FP32", body(x_all[:1000], batch_all[:1000], ["latent"])),
        (narrow_dt, body(narrow_x, batch_all[:1000], ["latent"], datatype=narrow_dt)),
    ]

    # the library in-process on the same 1,000 cells (what the server runs per request)
    import anndata as ad
    import pandas as pd

    model = scvi_onnx.load(BUNDLE, device="cpu")
    adata = ad.AnnData(
        X=x_all[:1000],
        obs=pd.DataFrame({"batch": batch_all[:1000]}, index=[f"c{i}" for i in range(1000)]),
        var=pd.DataFrame(index=list(model.genes)),
    )
    model.get_latent_representation(adata)
    reps = max(3, int(20 * q))

    def in_process() -> tuple[float, float]:
        """One round of ``reps`` calls: (cells/s, CPU ms per 1,000 cells)."""
        t, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            model.get_latent_representation(adata)
        return 1000 * reps / (time.perf_counter() - t), (time.process_time() - c0) / reps * 1e3

    server = Server(args.server_args.split())
    try:
        rows = []
        for c in (1, 8, 32):
            n = int(3000 * q)
            cpu0 = server.cpu_s()
            rps, lat = asyncio.run(load(server.port, single, n, c))
            # the server's own CPU per request: what the machine's load does not change much
            cpu_ms = (server.cpu_s() - cpu0) / (n + 50) * 1e3
            rows.append((c, rps, np.percentile(lat, 50), np.percentile(lat, 99), cpu_ms))
        results["single_cell_latent"] = [
            {"concurrency": c, "req_per_s": r, "p50_ms": p50, "p99_ms": p99, "server_cpu_ms": cpu}
            for c, r, p50, p99, cpu in rows
        ]
        big_rows = big_latent(server, big, 1, q, in_process)
        scoring = []
        for out, params in (("elbo", {}), ("marginal_ll", {"n_mc_samples": 1000})):
            b = [body(x_all[:100], batch_all[:100], [out], params)]
            _, lat = asyncio.run(load(server.port, b, max(5, int(20 * q)), 1, warmup=1))
            scoring.append((out, params, np.percentile(lat, 50), np.percentile(lat, 99)))
        results["scoring_100_cells"] = [
            {"output": o, "parameters": p, "p50_ms": p50, "p99_ms": p99}
            for o, p, p50, p99 in scoring
        ]
        rss = [server.rss_mb()]
        total = int(10_000 * q)
        for _ in range(10):
            asyncio.run(load(server.port, single, total // 10, 8, warmup=0))
            rss.append(server.rss_mb())
        results["rss_mb_every_1000_requests"] = rss
    finally:
        server.stop()
    # the same 1,000-cell requests to a server of several worker processes
    for workers in args.workers:
        server = Server(["--workers", str(workers), *args.server_args.split()])
        try:
            big_rows += big_latent(server, big, workers, q, in_process)
        finally:
            server.stop()
    results["latent_1000_cells"] = [
        {
            "workers": w,
            "counts": dt,
            "body_bytes": size,
            "concurrency": c,
            "cells_per_s": cps,
            "p50_ms": p50,
            "inprocess_cells_per_s": ref,
            "vs_inprocess": cps / ref,
            "server_cpu_ms": cpu,
            "inprocess_cpu_ms": ref_cpu,
        }
        for w, dt, size, c, cps, p50, cpu, ref, ref_cpu in big_rows
    ]

    print(
        f"\nscvi-onnx serve, {results['machine']['cpus']} CPUs, loopback, binary tensor data, "
        f"shipped bundle; load average at start {results['machine']['load_avg_at_start'][0]:.1f}"
    )
    print(
        "\n| single-cell latent | requests/s | p50 ms | p99 ms | server CPU ms/request |"
        "\n|---|---|---|---|---|"
    )
    for r in results["single_cell_latent"]:
        print(
            f"| concurrency {r['concurrency']} | {r['req_per_s']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['server_cpu_ms']:.2f} |"
        )
    print(
        "\n| 1,000-cell latent | body MB | cells/s | p50 ms | in-process cells/s (side by "
        "side) | vs in-process | server CPU ms/request | in-process CPU ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results["latent_1000_cells"]:
        print(
            f"| {r['workers']} worker{'s' if r['workers'] > 1 else ''}, {r['counts']} counts, "
            f"concurrency {r['concurrency']} | "
            f"{r['body_bytes'] / 1e6:.1f} | {r['cells_per_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['inprocess_cells_per_s']:.0f} | {r['vs_inprocess']:.2f}x | "
            f"{r['server_cpu_ms']:.1f} | {r['inprocess_cpu_ms']:.1f} |"
        )
    print("\n| 100 cells | p50 ms | p99 ms |\n|---|---|---|")
    for r in results["scoring_100_cells"]:
        extra = f" ({r['parameters']['n_mc_samples']} samples)" if r["parameters"] else ""
        print(f"| {r['output']}{extra} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    print(
        "\nserver RSS (MB) every 1,000 of 10,000 single-cell requests: "
        + ", ".join(f"{v:.0f}" for v in results["rss_mb_every_1000_requests"])
    )
    out = ROOT / "benchmarks" / "results" / time.strftime("serve-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
