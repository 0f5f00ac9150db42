"""Two versions of the runtime side by side: the same benchmark jobs, interleaved in one sitting.

For a change that must not cost speed or memory (a restructuring): the scvi-onnx side of
``run.py`` (``worker.py --side onnx``, every job in a fresh process) on the same models, cells
and batch size, once with this checkout's runtime and once with another checkout's (``--old``,
e.g. a ``git worktree`` of the previous release), in ABBA order per repeat so that a machine
getting slower or faster during the sitting touches both alike. The run-to-run noise is stated
per row: the spread (max / min) of each side's job medians.

    git worktree add /tmp/old 12359f9              # the runtime before the change
    python benchmarks/versions.py --old /tmp/old   # pbmc_zinb and census, 20,000 cells

The other checkout's ``runtime/`` is imported as ``scvi_onnx`` through a ``PYTHONPATH`` shim
(its bundles must be readable by both: export them with either, the format is the same).
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

from run import _run_rss, prepare  # noqa: E402

TASKS = ["latent", "elbo", "rec", "mll"]


def job(side_env: dict, task: str, model_dir: Path, data: Path, args) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "worker.py"),
        "--side",
        "onnx",
        "--task",
        task,
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--batch-size",
        str(args.batch_size),
        "--repeats",
        str(args.inner_repeats),
        "--n-mc",
        str(args.n_mc),
        "--mll-cells",
        str(args.mll_cells),
        "--device",
        "cpu",
        "--backed",
    ]
    _, _, out = _run_rss(cmd, env={**os.environ, **side_env})
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", required=True, help="a checkout of the other version")
    p.add_argument("--models", nargs="+", default=["pbmc_zinb", "census"])
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--n-cells", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per side (ABBA)")
    p.add_argument("--inner-repeats", type=int, default=2, help="timed calls per process")
    p.add_argument("--n-mc", type=int, default=1000)
    p.add_argument("--mll-cells", type=int, default=256)
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()

    shim = Path(tempfile.mkdtemp(prefix="scvi-onnx-old-"))
    (shim / "scvi_onnx").symlink_to(Path(args.old).resolve() / "runtime")
    sides = {"old": {"PYTHONPATH": str(shim)}, "new": {}}
    versions = {}
    for side, env in sides.items():
        out = subprocess.run(
            [sys.executable, "-c", "import scvi_onnx; print(scvi_onnx.__version__)"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        versions[side] = out.stdout.strip()
    work = Path(args.work)
    rows = []
    for name in args.models:
        model_dir, data = prepare(name, work, args.n_cells)
        for task in args.tasks:
            runs: dict[str, list[dict]] = {"old": [], "new": []}
            for r in range(args.repeats):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for side in order:
                    runs[side].append(job(sides[side], task, model_dir, data, args))
            row = {"model": name, "task": task}
            for side, rs in runs.items():
                med = [x["median"] for x in rs]
                row[side] = {
                    "version": versions[side],
                    "median_s": float(np.median(med)),
                    "spread": float(max(med) / min(med)),
                    "peak_rss_mb": float(np.median([x["peak_rss_mb"] for x in rs])),
                    "runs": rs,
                }
            row["new_over_old_time"] = row["new"]["median_s"] / row["old"]["median_s"]
            row["new_over_old_memory"] = row["new"]["peak_rss_mb"] / row["old"]["peak_rss_mb"]
            rows.append(row)
            print(
                f"{name:10s} {task:7s} old {row['old']['median_s']:.3f} s "
                f"(spread {row['old']['spread']:.2f}) new {row['new']['median_s']:.3f} s "
                f"(spread {row['new']['spread']:.2f}) time ratio {row['new_over_old_time']:.3f} "
                f"memory ratio {row['new_over_old_memory']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    report = {"args": vars(args), "versions": versions, "cpus": os.cpu_count(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"versions-{stamp}.json").write_text(json.dumps(report, indent=1))
    print(render(report))


def render(report: dict) -> str:
    a, v = report["args"], report["versions"]
    lines = [
        f"scvi-onnx {v['old']} (--old {a['old']}) vs {v['new']} (this checkout); "
        f"{a['n_cells']} cells, batch size {a['batch_size']}, backed; marginal LL "
        f"{a['mll_cells']} cells x {a['n_mc']} samples; median of {a['repeats']} processes per "
        f"side (ABBA), each the median of {a['inner_repeats']} calls",
        "",
        "| model | task | old s | new s | new / old | noise (max/min per side) | old MB | new MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        o, n = r["old"], r["new"]
        lines.append(
            f"| {r['model']} | {r['task']} | {o['median_s']:.3f} | {n['median_s']:.3f} | "
            f"{r['new_over_old_time']:.3f} | {o['spread']:.2f} / {n['spread']:.2f} | "
            f"{o['peak_rss_mb']:.0f} | {n['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
