"""The server's dependencies are imported by the ``serve`` command only: not by
``import scvi_onnx``, the other commands, or the client."""

from __future__ import annotations

import subprocess
import sys

from .conftest import SHIPPED


def loaded_after(code: str) -> list[str]:
    probe = (
        f"{code}\nimport sys\n"
        "print([m for m in ('starlette', 'uvicorn', 'anyio', 'aiohttp') if m in sys.modules])"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def test_server_stack_only_for_serve():
    assert loaded_after("import scvi_onnx, scvi_onnx.serve") == "[]"
    assert loaded_after("import scvi_onnx.serve.client, scvi_onnx.serve.protocol") == "[]"
    assert loaded_after(f"from scvi_onnx.cli import main; main(['info', {str(SHIPPED)!r}])") == "[]"
