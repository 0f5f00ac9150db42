"""``scvi-onnx serve``: load and check every bundle, bind, serve with uvicorn, drain on SIGTERM.

Order of startup, each step refusing with one line and a non-zero exit:

1. every bundle's manifest, digest (``NAME=PATH@DIGEST`` pins it), file checksums and load;
2. every bundle's self-check against the probes stored at export (:func:`scvi_onnx.verify`);
3. the token file, TLS files and audit log;
4. the listening socket.

Only then does the server answer, so ``/v2/health/ready`` is 200 from the first request on; it
turns 503 when SIGTERM starts the drain (in-flight requests finish, then the process exits 0).
The server makes no outbound connection and sends no telemetry.

With ``workers`` > 1 (``--workers N``), steps 1-2 run in each worker process instead, after 3-4
here, and this process supervises them (:mod:`~scvi_onnx.serve.workers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
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
        # listening from here on: a client that connects while the server starts waits in
        # the backlog instead of being refused
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class ServeSettings:
    """What a server process needs to load its models and answer (picklable: the worker
    processes of ``--workers N`` start from it)."""

    specs: list[BundleSpec]
    device: str
    n_threads: int | None
    limits: Limits
    options: ServeOptions  # the token inside
    tls_cert: str | None
    tls_key: str | None
    audit_log: str | None


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
    workers: int = 1,
) -> int:
    """Serve ``specs`` until SIGTERM / SIGINT; returns the exit status (0 after a drain).

    ``workers`` > 1: that many server processes, each with its own models, answer the
    connections this process accepts and hands them (:mod:`~scvi_onnx.serve.workers`)."""
    try:
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CLIError(f"serve needs the serve extra ({e}): pip install 'scvi-onnx[serve]'") from e
    from .observe import AuditLog

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CLIError(f"--workers must be a positive integer, got {workers!r}")
    if workers > 1 and not hasattr(socket, "send_fds"):
        raise CLIError("--workers needs a Unix system (connections are passed between processes)")
    limits = dataclasses.replace(limits or Limits(), workers=workers)
    options = options or ServeOptions()
    if (tls_cert is None) != (tls_key is None):
        raise CLIError("TLS needs both --tls-cert and --tls-key")
    token = _read_token(token_file) if token_file else None
    settings = ServeSettings(
        specs=list(specs),
        device=device,
        n_threads=n_threads,
        limits=limits,
        options=ServeOptions(**{**options.__dict__, "token": token}),
        tls_cert=tls_cert,
        tls_key=tls_key,
        audit_log=audit_log,
    )
    logging.captureWarnings(True)  # the library's warnings go to the log, once per place
    served = None
    if workers == 1:
        served = load_models(specs, device=device, n_threads=n_threads, limits=limits)
        for line in serving_lines(served):
            _note(line)
    # else each worker process loads and checks the models, and the first says what it serves
    audit = None
    if audit_log:
        try:
            audit = AuditLog(audit_log)
        except OSError as e:
            raise CLIError(f"cannot open --audit-log {audit_log}: {e.strerror or e}") from e
    uvicorn_config(settings, _no_app)  # TLS files checked here, before anything listens
    sock = _bind(host, port)
    scheme = "https" if tls_cert else "http"
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    listening = (
        f"listening on {scheme}://{shown}:{bound[1]} ("
        + ("token required" if token else "no token: anyone who can reach the port may call it")
        + (f"; audit log {audit_log}" if audit_log else "")
        + (f"; {workers} worker processes" if workers > 1 else "")
        + ")"
    )
    if workers > 1:
        from .workers import supervise

        if audit is not None:
            audit.close()  # opened to check it: each worker appends to it
        try:
            return supervise(settings, sock, workers, lambda: _note(listening))
        finally:
            sock.close()
    _note(listening)
    try:
        code = run_server(settings, served, audit, sock)
    finally:
        sock.close()
    _note("stopped")
    return code


def serving_lines(served: dict[str, ServedModel]) -> list[str]:
    from ..models.registry import feature_name

    return [
        f"serving {m.name} ({m.model.manifest.model_class}, {len(m.genes)} "
        f"{feature_name(m.model.manifest.model_class)}, version "
        f"{m.version}, digest {m.digest}) from {m.path} on {m.model.provider}"
        for m in served.values()
    ]


async def _no_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
    """The application of the configuration that only checks the TLS files (never served)."""
    raise RuntimeError("not served")


def uvicorn_config(settings: ServeSettings, app: Any):
    """uvicorn's configuration of a server process (loaded: a TLS problem is a CLIError)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # the client address is the peer's, never a header's claim
        server_header=False,
        lifespan="off",
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(settings.options.request_timeout) + 5,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        http=_fastest("httptools", "h11"),
        loop=_fastest("uvloop", "asyncio"),
    )
    try:
        config.load()
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise CLIError(f"cannot use --tls-cert/--tls-key: {e}") from e
    return config


def run_server(
    settings: ServeSettings,
    served: dict[str, ServedModel],
    audit: Any,
    sock: socket.socket | None,
    shared: Any = None,
    channel: socket.socket | None = None,
) -> int:
    """Answer with ``served`` until a signal has drained the requests: 0, or 1 when the server
    could not start. Connections come from the listening ``sock``, or (a worker process of
    several) from the supervisor over ``channel``."""
    state = InferenceServer(served, settings.options, audit, shared)
    # a worker process of several leaves Ctrl-C to its supervisor, which passes SIGTERM on
    config = uvicorn_config(settings, state.app)
    server = _Server(config, state, sigint=channel is None, channel=channel)
    try:
        server.run(sockets=None if sock is None else [sock])
    finally:
        state.close()
    return 0 if server.started else 1


def _fastest(preferred: str, fallback: str) -> str:
    import importlib.util

    return preferred if importlib.util.find_spec(preferred) is not None else fallback


class _Server:
    """uvicorn's server, with readiness turned off as soon as a shutdown signal arrives.

    With ``channel`` (a worker process of ``serve --workers N``) it listens on no socket of
    its own: its connections are those the supervisor accepted and passed over ``channel``
    (a Unix socket, one file descriptor per message), each served by uvicorn's protocol as if
    uvicorn had accepted it, so the drain on SIGTERM covers them."""

    def __new__(cls, config: Any, state: InferenceServer, sigint: bool = True, channel: Any = None):
        import asyncio

        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if not sigint and sig == signal.SIGINT:
                    return
                if state.ready:
                    state.ready = False
                    _note(f"signal {sig}: draining in-flight requests, then stopping")
                super().handle_exit(sig, frame)
                # uvicorn re-raises a captured signal once drained (the process would then die
                # by SIGTERM); a drained server exits 0 instead
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

            async def startup(self, sockets: list | None = None) -> None:
                await super().startup(sockets=[] if channel is not None else sockets)
                if channel is None or not self.started:
                    return
                loop = asyncio.get_running_loop()
                config = self.config

                def protocol():  # as uvicorn makes one for each connection it accepts
                    return config.http_protocol_class(
                        config=config, server_state=self.server_state, app_state=self.lifespan.state
                    )

                def handed_over() -> None:
                    try:
                        _, fds, _, _ = socket.recv_fds(channel, 64, 64)
                    except (BlockingIOError, InterruptedError):
                        return
                    except OSError:
                        fds = []
                    if not fds:  # the supervisor is gone: stop
                        loop.remove_reader(channel.fileno())
                        self.should_exit = True
                        return
                    for fd in fds:
                        conn = socket.socket(fileno=fd)
                        conn.setblocking(False)
                        loop.create_task(_adopt(loop, protocol, conn, config.ssl))

                channel.setblocking(False)
                loop.add_reader(channel.fileno(), handed_over)

            async def shutdown(self, sockets: list | None = None) -> None:
                if channel is not None:
                    # no new connections; the supervisor stops handing them over
                    with contextlib.suppress(Exception):
                        asyncio.get_running_loop().remove_reader(channel.fileno())
                    channel.close()
                await super().shutdown(sockets=sockets)

        return Server(config)


async def _adopt(loop: Any, protocol: Any, conn: socket.socket, ssl: Any) -> None:
    try:
        await loop.connect_accepted_socket(protocol, conn, ssl=ssl)
    except OSError as e:  # the client went away, or its TLS handshake failed
        logger.info("a handed-over connection failed (%s)", e)
        conn.close()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
