"""The distribution holds every package: a wheel built from the checkout (what
`pip install ".[cpu,export]"` installs, without -e) has each folder of runtime/ and exporter/
that is a package. The package list in pyproject.toml is written by hand; a wheel without
scvi_onnx.exporter.specs could not export (ModuleNotFoundError), while the editable installs of
`make demo` / `make test` hid it."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from .conftest import ROOT


def build_wheel(tmp_path, env=None):
    """A wheel built from a copy of the checkout's sources (no build outputs: a build/ folder
    would be reused)."""
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build requirement
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("runtime", "exporter"):
        ignore = shutil.ignore_patterns("__pycache__", "*.so")  # no build outputs
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("scvi_onnx-*.whl")
    return wheel


def kernel_libraries(names) -> list[str]:
    """The compiled likelihood kernel's library among a wheel's files (not its C source)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [n for n in names if n.startswith("scvi_onnx/maths/_kernels") and n.endswith(suffixes)]


def test_wheel_holds_every_package(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for src, dest in (
        (ROOT / "runtime", ("scvi_onnx",)),
        (ROOT / "exporter", ("scvi_onnx", "exporter")),
    ):
        for init in src.rglob("__init__.py"):
            want.add("/".join((*dest, *init.parent.relative_to(src).parts)) + "/")
    missing = sorted(w for w in want if not any(n.startswith(w) for n in names))
    assert not missing, missing
    assert "scvi_onnx/exporter/specs/totalvae.py" in names
    assert "scvi_onnx/sessions/ops.py" in names
    if shutil.which("cc") or shutil.which("gcc"):  # the optional compiled likelihood is built
        assert kernel_libraries(names), sorted(names)


def test_without_a_c_compiler_the_install_goes_on_and_numpy_kernels_run(tmp_path):
    """A slim image (python:3.x-slim has no gcc): the optional kernel fails to build, the wheel
    is built all the same, and the installed runtime says so and scores with numpy's kernels."""
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false -shared"}
    wheel = build_wheel(tmp_path, env)
    names = zipfile.ZipFile(wheel).namelist()
    assert not kernel_libraries(names), names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what pip install puts in site-packages
    script = (
        "import numpy as np\n"
        "from scvi_onnx.data.entries import Entries\n"
        "from scvi_onnx.maths import native\n"
        "from scvi_onnx.maths.likelihood import MinibatchScorer, count_constant\n"
        "x = np.array([[0, 3, 1]], np.float32); th = np.array([2, 1, 5], np.float32)\n"
        "e = Entries.from_dense(x)\n"
        "s = MinibatchScorer('nb', x, e, th, count_constant(e, th, likelihood='nb'))\n"
        "mu = np.array([[[0.5, 2.0, 1.5]]], np.float32)\n"
        "print(native.__file__)\n"
        "print(native.available(), native.describe(), repr(float(s.score(mu)[0, 0])))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, result = proc.stdout.splitlines()
    assert where.startswith(str(target))  # the installed copy ran, not the checkout's
    available, rest = result.split(" ", 1)
    assert available == "False"
    assert "not built" in rest
    # the NB log-pmf summed over the three genes, by scipy: numpy's kernel ran
    from scipy import stats

    mu, th, x = np.array([0.5, 2.0, 1.5]), np.array([2.0, 1.0, 5.0]), np.array([0, 3, 1])
    want = stats.nbinom.logpmf(x, th, th / (th + mu)).sum()
    assert float(rest.rsplit(" ", 1)[1]) == pytest.approx(want, rel=1e-5)
