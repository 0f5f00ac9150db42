"""``scvi-onnx serve``: load and check every bundle, bind, serve with uvicorn, drain on SIGTERM.

Order of startup, each step refusing with one line and a non-zero exit:

1. every bundle's manifest, digest (``NAME=PATH@DIGEST`` pins it), file checksums and load;
2. every bundle's self-check against the probes stored at export (:func:`scvi_onnx.verify`);
3. the token file, TLS files and audit log;
4. the listening socket.

Only then does the server answer, so ``/v2/health/ready`` is 200 from the first request on; it
turns 503 when SIGTERM starts the drain (in-flight requests finish, then the process exits 0).
The server makes no outbound connection and sends no telemetry.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cli.common import PROG, CLIError
from .app import InferenceServer, ServeOptions
from .models import Limits, ServedModel

logger = logging.getLogger("scvi_onnx.serve")


@dataclass(frozen=True)
class BundleSpec:
    """A bundle to serve: its name, folder and pinned digest (or ``None``)."""

    name: str
    path: Path
    digest: str | None = None


def _note(text: str) -> None:
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def load_models(specs: list[BundleSpec], *, device: str, n_threads: int | None, limits: Limits):
    """Load, pin and self-check every bundle; a failure is one :class:`CLIError` line naming
    the bundle (and, from the library's message, the file)."""
    from .. import load, verify
    from ..errors import ScviOnnxError

    served: dict[str, ServedModel] = {}
    for spec in specs:
        try:
            model = load(
                spec.path,
                device=device,
                expected_digest=spec.digest,
                n_threads=n_threads,
            )
            report = verify(spec.path, device=device)
        except (ScviOnnxError, OSError) as e:
            raise CLIError(f"cannot serve {spec.path}: {e}") from e
        if model.manifest.registry.modalities is not None:
            # a setup_mudata model (TOTALVI) reads a MuData: requests become one
            try:
                import mudata  # noqa: F401
            except ImportError as e:
                raise CLIError(
                    f"cannot serve {spec.path}: the model was set up with setup_mudata and its "
                    "requests are read as a MuData, which needs the mudata package "
                    "(pip install mudata)"
                ) from e
        if not report.ok:
            bad = [r.output for r in report.rows if not r.ok] or ["(no probe outputs)"]
            raise CLIError(
                f"cannot serve {spec.path}: its self-check failed on this machine "
                f"({', '.join(bad)} out of tolerance; `scvi-onnx verify {spec.path}` shows "
                "the numbers)"
            )
        served[spec.name] = ServedModel(spec.name, model, limits)
        try:
            served[spec.name].warm_up()
        except ScviOnnxError as e:  # not fatal: the first request pays the lazy imports
            logger.warning("warm-up of %s failed (%s)", spec.name, e)
    return served


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read --token-file {path}: {e}") from e
    if len(token) < 16 or any(c.isspace() for c in token):
        raise CLIError(
            f"--token-file {path} must hold one token of at least 16 characters without "
            "spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return token


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CLIError(f"cannot resolve --host {host}: {e.strerror or e}") from e
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


def serve(
    specs: list[BundleSpec],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    n_threads: int | None = None,
    limits: Limits | None = None,
    options: ServeOptions | None = None,
    token_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    audit_log: str | None = None,
) -> int:
    """Serve ``specs`` until SIGTERM / SIGINT; returns the exit status (0 after a drain)."""
    try:
        import uvicorn
    except ImportError as e:
        raise CLIError(f"serve needs the serve extra ({e}): pip install 'scvi-onnx[serve]'") from e
    from .observe import AuditLog

    limits = limits or Limits()
    options = options or ServeOptions()
    if (tls_cert is None) != (tls_key is None):
        raise CLIError("TLS needs both --tls-cert and --tls-key")
    token = _read_token(token_file) if token_file else None
    logging.captureWarnings(True)  # the library's warnings go to the log, once per place
    served = load_models(specs, device=device, n_threads=n_threads, limits=limits)
    for m in served.values():
        _note(
            f"serving {m.name} ({m.model.manifest.model_class}, {len(m.genes)} genes, version "
            f"{m.version}, digest {m.digest}) from {m.path} on {m.model.provider}"
        )
    audit = None
    if audit_log:
        try:
            audit = AuditLog(audit_log)
        except OSError as e:
            raise CLIError(f"cannot open --audit-log {audit_log}: {e.strerror or e}") from e
    server_state = InferenceServer(
        served, ServeOptions(**{**options.__dict__, "token": token}), audit
    )
    config = uvicorn.Config(
        server_state.app,
        log_config=None,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # the client address is the peer's, never a header's claim
        server_header=False,
        lifespan="off",
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(options.request_timeout) + 5,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        http=_fastest("httptools", "h11"),
        loop=_fastest("uvloop", "asyncio"),
    )
    try:
        config.load()
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise CLIError(f"cannot use --tls-cert/--tls-key: {e}") from e
    sock = _bind(host, port)
    scheme = "https" if tls_cert else "http"
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    _note(
        f"listening on {scheme}://{shown}:{bound[1]} ("
        + ("token required" if token else "no token: anyone who can reach the port may call it")
        + (f"; audit log {audit_log}" if audit_log else "")
        + ")"
    )
    server = _Server(config, server_state)
    try:
        server.run(sockets=[sock])
    finally:
        server_state.close()
        sock.close()
    _note("stopped")
    return 0 if server.started else 1


def _fastest(preferred: str, fallback: str) -> str:
    import importlib.util

    return preferred if importlib.util.find_spec(preferred) is not None else fallback


class _Server:
    """uvicorn's server, with readiness turned off as soon as a shutdown signal arrives."""

    def __new__(cls, config: Any, state: InferenceServer):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if state.ready:
                    state.ready = False
                    _note(f"signal {sig}: draining in-flight requests, then stopping")
                super().handle_exit(sig, frame)
                # uvicorn re-raises a captured signal once drained (the process would then die
                # by SIGTERM); a drained server exits 0 instead
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

        return Server(config)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
