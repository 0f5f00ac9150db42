"""ONNX Runtime sessions: explicit providers, checked against what really runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import BundleIntegrityError, ProviderError

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

#: Default intra-op threads. With more than one, ONNX Runtime's CPU kernels partition work by
#: minibatch shape and a row's float32 result can change in the last bit with the batch size
#: (measured: batch sizes 7, 47, 243 of the shipped model with 2 threads). One thread keeps
#: results bit-identical for any batch size; pass ``intra_op_threads`` to trade that for speed.
DEFAULT_INTRA_OP_THREADS = 1

#: CUDA provider options. TF32 is off: the CUDA EP computes float32 matmuls in TF32 by default,
#: which moves results by ~1e-3 relative; parity with torch (which does not) comes first.
CUDA_OPTIONS: dict[str, Any] = {"use_tf32": 0}


def import_onnxruntime():
    """``onnxruntime``, or a :class:`ProviderError` saying which extra installs it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ProviderError(
            "onnxruntime is not installed: install scvi-onnx with an ONNX Runtime, "
            "pip install 'scvi-onnx[cpu]' (CPU) or 'scvi-onnx[gpu]' (CUDA; never both in one "
            "environment)"
        ) from e
    return onnxruntime


def _gpu_present() -> bool:
    # onnxruntime-gpu lists CUDA even without a GPU (and prints errors when asked for it).
    return Path("/proc/driver/nvidia/version").exists()


def _session_options(ort, intra_op_threads: int | None, *, cpu: bool):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(intra_op_threads or DEFAULT_INTRA_OP_THREADS)
    if cpu:
        # No memory pattern: with one, ONNX Runtime keeps a block sized for all of a call's
        # intermediates per input shape, and concurrent calls each take one. The marginal LL
        # of the 100,000-region PEAKVI (2 threads, 64 x 100,000 decoder outputs a call) peaked
        # at 748-758 MB with it and 683-696 without, the same time within noise (and the
        # shipped-size models the same time and memory).
        so.enable_mem_pattern = False
    return so


def _new_session(ort, path, so, providers):
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if any(p == CUDA or (isinstance(p, tuple) and p[0] == CUDA) for p in providers):
            raise
        raise BundleIntegrityError(
            f"{Path(path).name} is not a valid ONNX graph ({msg}); re-export the bundle"
        ) from e


def may_use_cuda(device: str) -> bool:
    """Whether a session on ``device`` would try CUDA (``"cuda"``, or ``"auto"`` where the CUDA
    provider is installed and a GPU is visible); no session is made."""
    if device == "cuda":
        return True
    if device != "auto":
        return False
    return CUDA in import_onnxruntime().get_available_providers() and _gpu_present()


def create_session(path: str | Path, device: str = "auto", *, intra_op_threads: int | None = None):
    """Create an ``InferenceSession`` on ``device`` ("auto", "cpu" or "cuda").

    Returns ``(session, provider)`` where ``provider`` is the execution provider that runs.

    Raises
    ------
    ProviderError
        ``device="cuda"`` but CUDA cannot be used here (the message lists what is available).
    """
    ort = import_onnxruntime()
    if device not in DEVICES:
        raise ProviderError(f"device must be one of {DEVICES}, got {device!r}")
    available = ort.get_available_providers()
    if may_use_cuda(device):
        if CUDA not in available:
            raise ProviderError(
                f"device='cuda' but onnxruntime {ort.__version__} offers only {available}; "
                "install onnxruntime-gpu (and not onnxruntime) or use device='cpu'"
            )
        if device == "cuda" and not _gpu_present():
            raise ProviderError("device='cuda' but no NVIDIA GPU is visible; use device='cpu'")
        try:
            so = _session_options(ort, intra_op_threads, cpu=False)
            sess = _new_session(ort, path, so, [(CUDA, CUDA_OPTIONS), CPU])
        except Exception as e:  # onnxruntime raises its own exception types
            if device == "cuda":
                raise ProviderError(f"cannot create a CUDA session: {e}") from e
            logger.warning("CUDA session failed (%s); using the CPU", e)
        else:
            if sess.get_providers()[0] == CUDA:
                return sess, CUDA
            if device == "cuda":
                raise ProviderError(
                    "onnxruntime fell back to the CPU: the CUDA provider did not load "
                    "(check the CUDA/cuDNN libraries); use device='cpu'"
                )
            logger.warning("CUDA provider did not load; using the CPU")
    so = _session_options(ort, intra_op_threads, cpu=True)
    return _new_session(ort, path, so, [CPU]), CPU
