"""Scale-out benchmark: the methods on a Dask LocalCluster vs the in-process run, side by side.

    python benchmarks/distributed.py                               # 200k and 1M cells
    python benchmarks/distributed.py --n-cells 50000 --no-census   # a quick look

On one machine, the same bundle (models/pbmc_scvi), cells (benchmarks/make_data.py's recipe,
the file written once under benchmarks/work/ and reused) and minibatch:

* ``in-process``: ``scvi_onnx.load(..., n_threads=2)`` on the backed h5ad (2 threads);
* ``dask``: a LocalCluster of 2 single-threaded worker processes (started under
  ``WORKER_CONFIG``), the h5ad read lazily (``anndata.experimental.read_elem_lazy``, CSR
  chunks of ``--chunk`` rows), per-cell results written by the workers into a zarr store
  (``.to_zarr``), then read back and compared with the in-process outputs, bit for bit.

Besides wall time (which other processes on the machine disturb), the CPU seconds each side
spends (in-process: the process; Dask: the client with its scheduler, plus every worker).

Before each job the data file is read once, so both sides read it from the page cache (the
side that ran first used to pay the disk). Every job runs in a fresh process (a fresh
cluster), so peak memory is the job's own: the
client's (with the scheduler, which a LocalCluster runs in the client process) and each
worker's, from the kernel's high-water mark reset after the warm-up (the run's peak, not the
set-up's); the Dask client's is read before the check reads the outputs back. Throughput
excludes start-up (the model is loaded, and the workers warmed up on one chunk each, before
the clock starts). From the Dask task stream: each chunk's cost split into
reading (the lazy block's task, where it has one), compute (the chunk's task) and the rest
(scheduling, transfers, idle: wall x workers - busy, per chunk). A lazy h5ad's blocks are read
inside the chunks' tasks (each block's read is a task of its own with no input), so their
reading counts as compute there; a block's read is also timed alone, in the client. With
``--census``, the same Dask job on a Census-shaped model (8,000 genes, 2 x 128 hidden, 50
latent, 10,000 batches: benchmarks/models.py) gives the per-cell costs the README's 50M-cell
projection starts from.

Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file's name is the dask package's: its folder must not shadow ``distributed`` (here
# and in the worker processes, which inherit sys.path).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")  # pragma: no cover


# ============================================================================================
# one job (in its own process)
# ============================================================================================
def job(args) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import anndata as ad
    import numpy as np

    import scvi_onnx

    bs, n = args.batch_size, args.cells
    if args.side == "in-process":
        adata = ad.read_h5ad(args.data, backed="r")
        model = scvi_onnx.load(args.bundle, device="cpu", n_threads=args.threads)
        warm = np.arange(min(n, 2 * bs))
        _method(model, adata, args.method, bs, indices=warm)
        t, cpu = time.perf_counter(), time.process_time()
        out = _method(
            model, adata, args.method, bs, indices=np.arange(n) if n < adata.n_obs else None
        )
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "client_peak_mb": _peak_rss_mb(),
            "check": _digest(out),
        }

    import dask
    import h5py
    from anndata.experimental import read_elem_lazy, read_lazy
    from distributed import Client, LocalCluster, get_task_stream

    from scvi_onnx.distributed import WORKER_CONFIG, cache

    # no dashboard, so nobody reads the workers' statistical profiles: not sampled
    with dask.config.set(
        {**WORKER_CONFIG, "distributed.worker.profile.enabled": False}
    ):  # glibc's mmap threshold, before the workers start
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=args.threads,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
    client = Client(cluster)
    model = scvi_onnx.load(args.bundle, device="cpu", intra_op_threads=args.ort_threads)
    meta = read_lazy(args.data)
    f = h5py.File(args.data, "r")
    X = read_elem_lazy(f["X"], chunks=(args.chunk, meta.n_vars))[:n]
    obs = meta.obs[_obs_keys(model)].to_memory().iloc[:n]
    lazy = ad.AnnData(X=X, obs=obs, var=meta.var.to_memory())
    # warm up: every worker loads the model, then one chunk each
    ref = cache.ModelRef(
        path=str(Path(args.bundle).resolve()),
        digest=cache.manifest_digest(args.bundle),
        device="cpu",
        intra_op_threads=args.ort_threads,
        scoring="auto",
    )
    client.run(_load, ref)
    _method(model, lazy[: min(n, args.chunk * args.workers)], args.method, bs, dask=True)
    # a block's read on its own (in the client, Dask's synchronous scheduler): scvi-onnx runs
    # a root read inside the chunk's task, where the task stream counts it as compute
    reads = []
    for j in [0, *range(min(5, len(X.chunks[0])))]:  # the first again: a warm-up
        block = X.blocks[j]
        t = time.perf_counter()
        block.compute(scheduler="synchronous")
        reads.append(time.perf_counter() - t)
    read_alone = float(np.median(reads[1:]))
    client.run(_reset_peak)
    _reset_peak()  # the client's too: its peak is the run's, not the setup's
    import tempfile

    import zarr

    with tempfile.TemporaryDirectory(dir=Path(args.data).parent) as tmp:
        store = str(Path(tmp) / "out.zarr")
        cpu0 = _cpu_s(client)
        with get_task_stream(client) as ts:
            t = time.perf_counter()
            # per-cell outputs go where a scale-out run puts them: written by the workers into
            # a zarr store, chunk by chunk (nothing accumulates on a worker or the client)
            _method(model, lazy, args.method, bs, dask=False).to_zarr(store)
            wall = time.perf_counter() - t
        cpu = _cpu_s(client) - cpu0
        # the client's peak of the run itself, before the check reads the outputs back
        client_peak = _peak_rss_mb()
        check = _digest(zarr.open_array(store, mode="r")[:])
    workers = client.run(_peak_rss_mb)
    costs = _chunk_costs(ts.data, wall, args.workers * args.threads)
    res = {
        "wall_s": wall,
        "cpu_s": cpu,
        "client_peak_mb": client_peak,
        "worker_peak_mb": sorted(workers.values()),
        "chunks": int(len(X.chunks[0])),
        **costs,
        "read_alone_s_per_chunk": read_alone,
        "check": check,
    }
    client.close()
    cluster.close()
    return res


def _cpu_s(client) -> float:
    """CPU seconds (user + system) of this process (client and scheduler) and every worker."""
    return time.process_time() + sum(client.run(time.process_time).values())


def _digest(a) -> str:
    """sha256 of an output's bytes: the two sides must agree bit for bit."""
    import hashlib

    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _obs_keys(model) -> list[str]:
    return list(dict.fromkeys(k for k, _ in model.manifest.registry.obs_columns()))


def _load(ref) -> None:
    from scvi_onnx.distributed import cache

    cache.cached_model(ref)  # the model stays on the worker (it cannot travel: ORT sessions)


def _reset_peak() -> None:
    """Reset this process's VmHWM (Linux: writing 5 to clear_refs), so the peak is the run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _method(model, adata, method, bs, *, indices=None, dask=False):
    if method == "latent":
        out = model.get_latent_representation(adata, indices=indices, batch_size=bs)
    else:
        out = model.get_elbo(adata, indices=indices, batch_size=bs, return_mean=False)
    return out.compute() if dask else out


def _chunk_costs(stream: list[dict], wall: float, slots: int) -> dict:
    """Per-chunk seconds of reading (the lazy blocks' tasks), compute (the chunks' tasks) and
    the rest (wall x slots - busy), from the Dask task stream."""
    read, compute, busy = [], [], 0.0
    for rec in stream:
        key = str(rec["key"])
        spent = sum(s["stop"] - s["start"] for s in rec["startstops"] if s["action"] == "compute")
        busy += sum(s["stop"] - s["start"] for s in rec["startstops"])
        if "scvi-onnx-" in key:
            compute.append(spent)
        elif "make_dask_chunk" in key or "getitem" in key or "rechunk" in key:
            read.append(spent)
    n = max(1, len(compute))
    return {
        "read_s_per_chunk": sum(read) / n,
        "compute_s_per_chunk": sum(compute) / n,
        "other_s_per_chunk": max(0.0, wall * slots - busy) / n,
    }


# ============================================================================================
# the orchestration (a small process: every measurement is a child of its own)
# ============================================================================================
def _warm_cache(path: str | Path) -> None:
    """Read the file once, so that the job after reads it from the page cache: whichever side
    ran first used to pay the disk (this machine reads ~630 MB/s; the 1M-cell file is 6.3 GB,
    and the kernel does not keep it cached between runs), which decided the ratio."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def _run_job(**kw) -> dict:
    if "data" in kw:
        _warm_cache(kw["data"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job"]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _data(work: Path, n: int, source: Path | None = None, name: str = "pbmc") -> Path:
    path = work / f"{name}_{n}.h5ad"
    if not path.exists():
        cmd = [sys.executable, str(HERE / "make_data.py"), "--n-cells", str(n), "-o", str(path)]
        if source is not None:
            cmd += ["--source", str(source)]
        subprocess.run(cmd, check=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", default="dask", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cells", type=int, help=argparse.SUPPRESS)
    p.add_argument("--method", default="latent", help=argparse.SUPPRESS)
    p.add_argument("--bundle", default=str(ROOT / "models" / "pbmc_scvi"))
    p.add_argument("--n-cells", type=int, nargs="+", default=[200_000, 1_000_000])
    p.add_argument("--methods", nargs="+", default=["latent", "elbo"])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=8192, help="rows per Dask chunk")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per worker (in-process: 2)")
    p.add_argument("--ort-threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument(
        "--configs",
        action="store_true",
        help="also compare worker layouts at the smallest size (2x1, 1x2, 2x1 with 2 ORT threads)",
    )
    p.add_argument("--configs-cells", type=int, default=100_000)
    p.add_argument("--census", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--census-cells", type=int, default=65_536)
    p.add_argument("--work", default=str(HERE / "work"))
    args = p.parse_args()
    if args.job:
        print(json.dumps(job(args)))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = _data(work, max(args.n_cells))
    rows = []
    common = {"bundle": args.bundle, "batch_size": args.batch_size, "chunk": args.chunk}
    for n in sorted(args.n_cells):
        for method in args.methods:
            base = _run_job(
                side="in-process", data=data, cells=n, method=method, threads=2, **common
            )
            dsk = _run_job(
                side="dask",
                data=data,
                cells=n,
                method=method,
                workers=args.workers,
                threads=args.threads,
                ort_threads=args.ort_threads,
                **common,
            )
            same = base["check"] == dsk["check"]  # bit-identical per-cell outputs
            rows.append(
                {"cells": n, "method": method, "identical": same, "in_process": base, "dask": dsk}
            )
            _print_row(rows[-1])
    layouts = []
    if args.configs:
        n = args.configs_cells
        for workers, threads, ort in ((2, 1, 1), (1, 2, 1), (2, 1, 2)):
            for method in args.methods:
                r = _run_job(
                    side="dask",
                    data=data,
                    cells=n,
                    method=method,
                    workers=workers,
                    threads=threads,
                    ort_threads=ort,
                    **common,
                )
                layouts.append(
                    {"workers": workers, "threads": threads, "ort": ort, "method": method, **r}
                )
                print(
                    f"layout {workers} proc x {threads} thr, ORT {ort}: {method} {n} cells "
                    f"{n / r['wall_s']:,.0f} cells/s, {1e6 * r['cpu_s'] / n:.1f} CPU s/1M",
                    flush=True,
                )
    census = None
    if args.census:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_models", HERE / "models.py")
        models = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(models)
        subprocess.run([sys.executable, str(HERE / "models.py"), "census", str(work)], check=True)
        cdir = work / "census"
        cdata = _data(work, args.census_cells, models.source_cells("census", work), "census")
        census = []
        for method in args.methods:
            r = _run_job(
                side="dask",
                data=cdata,
                cells=args.census_cells,
                method=method,
                workers=args.workers,
                threads=args.threads,
                ort_threads=args.ort_threads,
                bundle=cdir / "bundle",
                batch_size=args.batch_size,
                chunk=args.chunk,
            )
            census.append({"cells": args.census_cells, "method": method, **r})
            print(
                f"census-shaped {method}: {args.census_cells / r['wall_s']:,.0f} cells/s; per "
                f"chunk read {r['read_s_per_chunk']:.3f} s, compute "
                f"{r['compute_s_per_chunk']:.3f} s, other {r['other_s_per_chunk']:.3f} s"
            )
            _project(r, args.chunk)
    out = HERE / "results" / f"distributed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"args": vars(args), "rows": rows, "layouts": layouts, "census": census},
            indent=1,
            default=str,
        )
    )
    print(f"wrote {out}")


def _print_row(r: dict) -> None:
    n, b, d = r["cells"], r["in_process"], r["dask"]
    print(
        f"{r['method']:>6} {n:>9,} cells | in-process {n / b['wall_s']:>7,.0f} cells/s, "
        f"{1e6 * b['cpu_s'] / n:.1f} CPU s/1M, peak {b['client_peak_mb']:.0f} MB | dask "
        f"{n / d['wall_s']:>7,.0f} cells/s ({b['wall_s'] / d['wall_s']:.2f}x), "
        f"{1e6 * d['cpu_s'] / n:.1f} CPU s/1M ({b['cpu_s'] / d['cpu_s']:.2f}x), client "
        f"{d['client_peak_mb']:.0f} MB, workers "
        f"{' / '.join(f'{w:.0f}' for w in d['worker_peak_mb'])} MB | per chunk: read "
        f"{d['read_s_per_chunk']:.3f} s, compute {d['compute_s_per_chunk']:.3f} s (a read "
        f"alone: {d.get('read_alone_s_per_chunk', float('nan')):.3f} s), other "
        f"{d['other_s_per_chunk']:.3f} s | outputs "
        f"{'bit-identical' if r['identical'] else 'DIFFER'}",
        flush=True,
    )


def _project(r: dict, chunk: int, cells: float = 50e6, slots_per_machine: int = 2) -> None:
    """50M Census-shaped cells on N machines of this kind: chunks / (machines x slots) x the
    measured seconds per chunk (read + compute + other), all else equal."""
    per_chunk = r["read_s_per_chunk"] + r["compute_s_per_chunk"] + r["other_s_per_chunk"]
    chunks = cells / chunk
    for machines in (1, 4, 16, 64):
        hours = chunks * per_chunk / (machines * slots_per_machine) / 3600
        print(f"  projection: 50M cells on {machines:>2} machine(s): {hours:6.2f} h")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
