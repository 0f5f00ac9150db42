"""Peak memory of `scvi-onnx latent` on backed h5ad files of growing size (should be flat).

    python benchmarks/memory_scaling.py --n-cells 20000 200000 1000000

Each size is made by benchmarks/make_data.py (real PBMC cells drawn with replacement, counts
thinned; CSR), then embedded by a fresh `scvi-onnx latent BUNDLE DATA -o OUT.npy` process whose
wall time and peak RSS (VmHWM-equivalent, from wait4) are reported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    p.add_argument("--bundle", default=str(ROOT / "models" / "pbmc_scvi"))
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--batch-size", type=int, default=1024)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cli = str(Path(sys.executable).parent / "scvi-onnx")
    rows = []
    for n in args.n_cells:
        data = work / f"pbmc_zinb_{n}.h5ad"
        if not data.exists():
            subprocess.run(
                [sys.executable, str(HERE / "make_data.py"), "--n-cells", str(n), "-o", str(data)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        out = work / f"latent_{n}.npy"
        cmd = [
            cli,
            "latent",
            args.bundle,
            str(data),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            str(args.batch_size),
            "--no-progress",
            "--overwrite",
        ]
        with tempfile.TemporaryFile() as err:
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
            if os.waitstatus_to_exitcode(status) != 0:
                err.seek(0)
                raise RuntimeError(err.read().decode()[-2000:])
        size_gb = data.stat().st_size / 1e9
        rows.append((n, size_gb, wall, ru.ru_maxrss / 1024))
        print(
            f"{n:>9} cells  {size_gb:6.2f} GB file  {wall:7.1f} s  peak {rows[-1][3]:6.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    print("| cells | h5ad size | wall s | peak RSS MB |\n|---|---|---|---|")
    for n, gb, wall, rss in rows:
        print(f"| {n:,} | {gb:.2f} GB | {wall:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
