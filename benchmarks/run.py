"""Side-by-side benchmark: scvi-tools 1.4.2 vs scvi-onnx, same model, cells and batch size.

    python benchmarks/run.py                      # 20,000 cells, the four models
    python benchmarks/run.py --models pbmc_totalvi  # TOTALVI (RNA + 29 proteins) only
    python benchmarks/run.py --models pbmc_zinb --n-cells 20000 --repeats 3
    python benchmarks/run.py --device cuda --scvi-per-pass 1 100 1000   # on a GPU machine
    python benchmarks/run.py --models pbmc_peakvi peakvi_atac           # PEAKVI rows

scvi-tools 1.4.2 has no marginal LL for PEAKVI: its "scvi-tools" marginal-LL column is the same
estimate in torch over scvi-tools' PEAKVAE (worker.py: peakvi_marginal_ll).

Every job runs in a fresh process (separate peak memory). Prints a table of medians and ratios
with the environment, and writes it as JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from floor import matmul_floor  # noqa: E402

import models  # noqa: E402

TASKS = ["latent", "elbo", "rec", "mll"]


def _run_rss(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run a command (in ``env``, default this process's environment); return (wall seconds,
    peak RSS MB of exactly that process, stdout)."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, ru.ru_maxrss / 1024.0, out


def _python(side: str, args) -> str:
    """The interpreter of a side: ``--onnx-python`` for scvi-onnx (a runtime-only
    environment, as deployed), else this one."""
    return args.onnx_python if side == "onnx" and args.onnx_python else sys.executable


def worker(side, task, model_dir, data, args) -> dict:
    cmd = [
        _python(side, args),
        str(HERE / "worker.py"),
        "--side",
        side,
        "--task",
        task,
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--batch-size",
        str(args.batch_size),
        "--repeats",
        str(args.mll_repeats if task == "mll" else args.repeats),
        "--n-mc",
        str(args.n_mc),
        "--mll-cells",
        str(args.mll_cells),
        "--device",
        args.device,
    ]
    if side == "onnx" and not args.onnx_in_memory:
        cmd.append("--backed")  # a server's way: minibatches read from the file
    if args.dense:
        cmd.append("--dense")
    if side == "scvi" and task == "mll" and args.scvi_per_pass:
        # scvi-tools at each n_mc_samples_per_pass asked for; its fastest is the reference
        runs, failed = [], []
        for per_pass in args.scvi_per_pass:
            try:
                _, _, out = _run_rss([*cmd, "--per-pass", str(per_pass)])
            except RuntimeError as e:  # e.g. out of device memory at a large per_pass
                failed.append({"per_pass": per_pass, "error": str(e).splitlines()[-1][-300:]})
                print(f"scvi-tools n_mc_samples_per_pass={per_pass} failed", file=sys.stderr)
                continue
            runs.append({**json.loads(out.strip().splitlines()[-1]), "per_pass": per_pass})
        if not runs:
            raise RuntimeError(f"every scvi-tools n_mc_samples_per_pass failed: {failed}")
        best = min(runs, key=lambda r: r["median"])
        return {
            **best,
            "per_pass_runs": [{k: r[k] for k in ("per_pass", "median")} for r in runs] + failed,
        }
    _, _, out = _run_rss(cmd)
    return json.loads(out.strip().splitlines()[-1])


def cold_start(
    side, model_dir, data, out_dir: Path, bs: int, device: str = "cpu", python: str | None = None
) -> dict:
    """New process to the latent of every cell written to disk."""
    out = out_dir / f"cold_{side}.npy"
    if side == "onnx":
        cmd = [
            python or sys.executable,
            "-m",
            "scvi_onnx",  # the CLI (`scvi-onnx`), wherever the package was installed
            "latent",
            str(model_dir / "bundle"),
            str(data),
            "-o",
            str(out),
            "--device",
            device,
            "--batch-size",
            str(bs),
            "--no-progress",
            "--overwrite",
        ]
    else:
        model_class = json.loads((model_dir / "bundle" / "manifest.json").read_text())[
            "model_class"
        ]
        code = (
            "import warnings, logging; warnings.filterwarnings('ignore'); "
            "logging.disable(logging.WARNING); import anndata, numpy, scvi; "
            f"a = anndata.read_h5ad({str(data)!r}); "
            f"m = scvi.model.{model_class}.load({str(model_dir / 'torch')!r}, adata=a, "
            f"accelerator={'gpu' if device == 'cuda' else 'cpu'!r}); "
            f"numpy.save({str(out)!r}, m.get_latent_representation(a, batch_size={bs}))"
        )
        cmd = [sys.executable, "-c", code]
    wall, rss, _ = _run_rss(cmd)
    return {"side": side, "task": "cold", "median": wall, "times": [wall], "peak_rss_mb": rss}


def environment() -> dict:
    """Versions, read in a subprocess: this process stays small (a child's ru_maxrss starts
    from its parent's size at fork, so a heavy orchestrator would inflate every measurement)."""
    code = (
        "import json, os, platform, numpy, onnxruntime, scvi, torch, scvi_onnx; "
        "print(json.dumps({'python': platform.python_version(), 'machine': platform.machine(), "
        "'cpus': os.cpu_count(), 'numpy': numpy.__version__, "
        "'onnxruntime': onnxruntime.__version__, 'scvi_tools': scvi.__version__, "
        "'torch': torch.__version__, 'torch_threads': torch.get_num_threads(), "
        "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "
        "'scvi_onnx': scvi_onnx.__version__}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "cpu": cpu_model()}


def floor_ratio(times: list[float], floor_times: list[float]) -> float:
    """The median repeat over the fastest floor timed beside the repeats: a floor slowed by
    the VM's neighbours (one of two in-worker floors once took 2.08 s against 0.39 s) cannot
    flatter the ratio; a slowed repeat counts against us."""
    return float(np.median(times)) / min(floor_times)


def cpu_model() -> str | None:
    """The CPU's model name with its family and model numbers (``/proc/cpuinfo``): ratios
    between the product and the elementwise work differ between CPUs, and a VM's model name
    alone ("AMD EPYC") does not tell them apart (family 25: Zen 3 / Zen 4; 26: Zen 5). The same
    code took 2.9-3.4 s on a Zen 4 VM and 1.8 s on a Zen 5 one for the same marginal LL, with
    the same numpy product speed (ONNX Runtime's twice as fast on Zen 5)."""
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        return None
    name = fields.get("model name")
    if name and "cpu family" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def _job(side, task, model_dir, data, work: Path, args) -> dict:
    """One side's result of one task (a :func:`cold_start` or a :func:`worker` job)."""
    if task == "cold":
        return cold_start(
            side, model_dir, data, work, args.batch_size, args.device, _python(side, args)
        )
    return worker(side, task, model_dir, data, args)


def prepare(name: str, work: Path, n_cells: int) -> tuple[Path, Path]:
    """A benchmark model (trained / exported if needed) and its data of ``n_cells`` cells:
    ``(model folder, h5ad)``. Built in child processes: a child's ru_maxrss counts its parent's
    size at fork, so a heavy orchestrator would inflate the cold-start memory."""
    subprocess.run([sys.executable, str(HERE / "models.py"), name, str(work)], check=True)
    data = work / f"{name}_{n_cells}.h5ad"
    if not data.exists():
        subprocess.run(
            [
                sys.executable,
                str(HERE / "make_data.py"),
                "--n-cells",
                str(n_cells),
                "--source",
                str(models.source_cells(name, work)),
                "-o",
                str(data),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return work / name, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", nargs="+", default=["pbmc_zinb", "pbmc_nb", "census", "pbmc_totalvi"]
    )
    p.add_argument("--tasks", nargs="+", default=["cold", *TASKS])
    p.add_argument("--n-cells", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--mll-repeats", type=int, default=3, help="repeats of the (slow) marginal LL jobs"
    )
    p.add_argument("--n-mc", type=int, default=1000)
    p.add_argument("--mll-cells", type=int, default=256)
    p.add_argument(
        "--scvi-per-pass",
        type=int,
        nargs="+",
        default=None,
        help="scvi-tools n_mc_samples_per_pass; with several, each runs and the fastest is "
        "the reference (default: its default, 1)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="both sides on the CPU, or both on the GPU (scvi-tools accelerator='gpu', "
        "scvi-onnx device='cuda')",
    )
    p.add_argument(
        "--onnx-in-memory",
        action="store_true",
        help="scvi-onnx reads the h5ad into memory too (default: backed, 'r')",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="both sides read the h5ad into memory and densify X first (implies "
        "--onnx-in-memory; cold start still reads the CSR file)",
    )
    p.add_argument(
        "--onnx-python",
        default=None,
        help="the scvi-onnx side's interpreter: a runtime-only environment (`make demo`'s "
        ".venv: no torch, no dask), as deployed; default this one. With dask installed, "
        "`import anndata` imports dask.array too (~100 MB, ~0.7 s)",
    )
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    args.onnx_in_memory = args.onnx_in_memory or args.dense
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    rows = []
    path = Path(args.out) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def report(rows: list) -> dict:
        return {
            "environment": env,
            "args": vars(args),
            "rows": rows,
            # the first row that names it (a cold start runs the CLI, which does not)
            "onnx_provider": next(
                (r["onnx"]["provider"] for r in rows if r.get("onnx", {}).get("provider")), None
            ),
            "onnx_likelihood_kernel": next(
                (k for r in rows if (k := r.get("onnx", {}).get("likelihood_kernel"))), None
            ),
        }

    def write(rep: dict) -> None:
        path.write_text(json.dumps(rep, indent=1))

    for name in args.models:
        model_dir, data = prepare(name, work, args.n_cells)
        config = json.loads((model_dir / "bundle" / "manifest.json").read_text())["config"]
        for task in args.tasks:
            res, failed = {}, None
            for side in ("scvi", "onnx"):
                try:
                    res[side] = _job(side, task, model_dir, data, work, args)
                except RuntimeError as e:  # recorded; the other jobs go on
                    failed = (failed or "") + f"{side}: {str(e)[-2000:]}\n"
                    print(f"{name} {task} {side} FAILED:\n{e}", file=sys.stderr, flush=True)
                    continue
                print(
                    f"{name:10s} {task:7s} {side:5s} median {res[side]['median']:.3f} s  "
                    f"peak {res[side]['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
            if failed:
                rows.append({"model": name, "task": task, "n_cells": args.n_cells, "error": failed})
                write(report(rows))
                continue
            row = {
                "model": name,
                "task": task,
                "n_cells": args.n_cells,
                "batch_size": args.batch_size,
                "scvi": res["scvi"],
                "onnx": res["onnx"],
                "speedup": res["scvi"]["median"] / res["onnx"]["median"],
                "memory_ratio": res["onnx"]["peak_rss_mb"] / res["scvi"]["peak_rss_mb"],
            }
            if task == "mll" and args.device == "cpu":
                # the floor timed in the scvi-onnx worker after each repeat (worker.py)
                floors = res["onnx"].get("floor_times")
                if floors:
                    row["floor"] = {
                        "floor_s": float(min(floors)),
                        "floor_times": floors,
                        "measured": "in the scvi-onnx worker, after each repeat; the fastest",
                    }
                    row["onnx_over_floor"] = floor_ratio(res["onnx"]["times"], floors)
                else:  # an older worker: timed here, after the jobs
                    row["floor"] = matmul_floor(config, args.mll_cells * args.n_mc)
                    row["onnx_over_floor"] = res["onnx"]["median"] / row["floor"]["floor_s"]
            rows.append(row)
            write(report(rows))  # after every row: a run cut short keeps what it measured
    print(render(report(rows)))


def render(report: dict) -> str:
    env, a = report["environment"], report["args"]
    lines = [
        f"scvi-tools {env['scvi_tools']} (torch {env['torch']}, {env['torch_threads']} threads) "
        f"vs scvi-onnx {env['scvi_onnx']} (onnxruntime {env['onnxruntime']}, "
        f"{report['onnx_provider']}"
        + (
            f", {report['onnx_likelihood_kernel']} likelihood kernel"
            if report.get("onnx_likelihood_kernel")
            else ""
        )
        + f"); {env['cpus']} CPUs"
        f"{': ' + env['cpu'] if env.get('cpu') else ''}, python {env['python']}",
        f"{a['n_cells']} cells, batch size {a['batch_size']}, medians of {a['repeats']} repeats "
        f"(cold: 1 run); marginal LL: {a['mll_cells']} cells x {a['n_mc']} samples "
        f"(median of {a.get('mll_repeats', 1)}); device {a.get('device', 'cpu')}"
        f"{' (' + env['gpu'] + ')' if env.get('gpu') else ''}; scvi-tools reads the h5ad into "
        "memory, scvi-onnx "
        f"{'too' if a.get('onnx_in_memory') else 'backed (r)'}"
        f"{'; X densified on both sides' if a.get('dense') else ''}"
        f"{'; scvi-onnx in ' + a['onnx_python'] if a.get('onnx_python') else ''}",
        "",
    ]
    gpu = any("gpu_peak_mb" in r.get("onnx", {}) for r in report["rows"])
    lines += [
        "| model | task | scvi-tools s | scvi-onnx s | speed-up | scvi-tools MB | scvi-onnx MB "
        "| memory ratio |" + (" scvi-tools GPU MB | scvi-onnx GPU MB |" if gpu else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else ""),
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['task']} | failed: {r['error'][-200:]!r} |")
            continue
        extra = ""
        if "floor" in r:
            floor_s, ratio = r["floor"]["floor_s"], r["onnx_over_floor"]
            if "floor_times" in r["floor"]:  # results of earlier runs, under today's rule
                floor_s = min(r["floor"]["floor_times"])
                ratio = floor_ratio(r["onnx"]["times"], r["floor"]["floor_times"])
            extra = f" (matmul floor {floor_s:.2f} s: x{ratio:.2f})"
        if "per_pass" in r["scvi"]:
            extra += f" (scvi-tools' fastest: n_mc_samples_per_pass={r['scvi']['per_pass']})"
        lines.append(
            f"| {r['model']} | {r['task']} | {r['scvi']['median']:.3f} | {r['onnx']['median']:.3f}"
            f"{extra} | {r['speedup']:.1f}x | {r['scvi']['peak_rss_mb']:.0f} | "
            f"{r['onnx']['peak_rss_mb']:.0f} | {r['memory_ratio']:.2f} |"
            + (
                "".join(
                    f" {r[side]['gpu_peak_mb']:.0f} |" if "gpu_peak_mb" in r[side] else " - |"
                    for side in ("scvi", "onnx")
                )
                if gpu
                else ""
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
