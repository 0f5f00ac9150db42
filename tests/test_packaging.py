"""The distribution holds every package: a wheel built from the checkout (what
`pip install ".[cpu,export]"` installs, without -e) has each folder of runtime/ and exporter/
that is a package. The package list in pyproject.toml is written by hand; a wheel without
scvi_onnx.exporter.specs could not export (ModuleNotFoundError), while the editable installs of
`make demo` / `make test` hid it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from .conftest import ROOT


def test_wheel_holds_every_package(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build requirement
    # the sources copied without any build outputs (a build/ folder would be reused)
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
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("scvi_onnx-*.whl")
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
        assert any(n.startswith("scvi_onnx/maths/_kernels.") for n in names), sorted(names)
