"""``serve --workers N``: N server processes behind one listening socket, and their supervisor.

One Python process answers requests on one event loop and computes them on threads that share
one interpreter lock: on large requests (1,000 cells) its receiving, decoding and library work
keep it from using much more than one core. N processes (spawned, not forked: ONNX Runtime
holds threads) each load the bundles and serve the connections the supervisor passes them.

The supervisor (the ``serve`` process) checks the token, TLS files and audit log and binds the
socket; each worker loads and checks every bundle (checksums, pinned digest, self-check), and
the supervisor says ``listening on`` once all have. The supervisor holds no model. It accepts
the connections itself and hands each to the next ready worker in turn (a file descriptor over
a Unix socket), as Node.js's cluster module does: left to the kernel, processes sharing a
listening socket take connections unevenly (the first awake takes all that are pending, so two
or four keep-alive clients often land on one worker). A connection stays with its worker.

A worker that fails to start stops the server (exit 1, its reason in one line, as without
workers); one that dies later is replaced. SIGTERM or SIGINT: the supervisor stops accepting,
passes SIGTERM on, each worker drains its in-flight requests, and the supervisor exits 0 once
all have (1 if one did not exit cleanly). Metrics are summed over the workers
(:class:`~.observe.SharedMetrics`); the audit log is shared.
"""

from __future__ import annotations

import logging
import multiprocessing
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ..cli.common import PROG, CLIError

logger = logging.getLogger("scvi_onnx.serve")

#: A worker that dies within this many seconds of starting, this many times in a row, stops
#: the server (something about it is broken, not transient).
QUICK_DEATH_S = 10.0
QUICK_DEATHS = 3

#: How long the supervisor waits to pass a connection to a worker before trying the next.
HAND_OVER_TIMEOUT_S = 1.0


def _worker_main(
    settings: Any, index: int, metrics_dir: str, conn: Any, channel: socket.socket
) -> None:
    """A worker process: load and check the models, then serve the connections the supervisor
    hands over ``channel`` until a signal (or the supervisor's end)."""
    from .observe import AuditLog, SharedMetrics
    from .server import load_models, run_server, serving_lines

    # Ctrl-C reaches the whole process group: the supervisor turns it into SIGTERM for us,
    # which uvicorn handles as a drain once it runs (until then the default ends us)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG} [worker {index}]: %(message)s")
    logging.captureWarnings(True)
    try:
        served = load_models(
            settings.specs,
            device=settings.device,
            n_threads=settings.n_threads,
            limits=settings.limits,
        )
        audit = AuditLog(settings.audit_log) if settings.audit_log else None
    except (CLIError, OSError) as e:
        conn.send(("failed", str(e)))
        conn.close()
        sys.exit(2)
    conn.send(("ready", serving_lines(served)))
    conn.close()
    shared = SharedMetrics(metrics_dir, index)
    sys.exit(run_server(settings, served, audit, None, shared, channel=channel))


class _Worker:
    def __init__(self, ctx: Any, settings: Any, index: int, folder: str):
        self.index = index
        self.conn, child = ctx.Pipe(duplex=False)
        self.channel, their_channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel.settimeout(HAND_OVER_TIMEOUT_S)
        self.proc = ctx.Process(
            target=_worker_main,
            args=(settings, index, folder, child, their_channel),
            name=f"scvi-onnx-serve-{index}",
        )
        self.proc.start()
        child.close()
        their_channel.close()
        self.started = time.monotonic()
        self.ready = False
        self.lines: list[str] = []  # what it serves, once ready

    def hand_over(self, conn: socket.socket) -> bool:
        """Pass an accepted connection to this worker: False if it cannot take it."""
        try:
            socket.send_fds(self.channel, [b"c"], [conn.fileno()])
        except OSError:
            return False
        return True

    def poll(self, timeout: float = 0.0) -> str | None:
        """Read the worker's start message if it comes within ``timeout``: "ready" sets
        :attr:`ready` (and :attr:`lines`); returns the reason it could not start, else None."""
        if self.ready or self.conn.closed:
            return None
        try:
            if not self.conn.poll(timeout):
                return None
            kind, detail = self.conn.recv()
        except (EOFError, OSError):  # it ended without a word: its exit code tells
            return None
        if kind == "ready":
            self.ready, self.lines = True, list(detail)
            return None
        return str(detail)

    def close(self) -> None:
        self.channel.close()
        self.conn.close()


def supervise(settings: Any, sock: socket.socket, n: int, on_listening: Callable[[], None]) -> int:
    """Start ``n`` worker processes, hand them the connections accepted on ``sock`` in turn,
    keep them running, drain them on a signal; the exit status."""
    from .server import _note

    ctx = multiprocessing.get_context("spawn")
    folder = tempfile.mkdtemp(prefix="scvi-onnx-serve-")  # owner-only (0700)
    stopping = False
    workers: dict[int, _Worker] = {}

    def stop(sig: int, frame: Any) -> None:
        nonlocal stopping
        first, stopping = not stopping, True  # before the note: a second signal may cut in
        if first:
            _note(f"signal {sig}: draining the workers' in-flight requests, then stopping")

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    quick_deaths = 0
    codes: list[int] = []
    turn = 0
    try:
        for i in range(n):
            workers[i] = _Worker(ctx, settings, i, folder)
        # every worker has loaded and checked its models before the server says it listens
        for w in list(workers.values()):
            reason = _wait_ready(w, lambda: stopping)
            if reason is not None and not stopping:
                raise CLIError(reason)
            if w.index == 0 and w.ready:
                for line in w.lines:
                    _note(line)
        if not stopping:
            on_listening()
        sock.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            while not stopping:
                if sel.select(timeout=0.25):
                    # every pending connection, to the ready workers in turn
                    while True:
                        try:
                            conn, _ = sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as e:  # out of file descriptors, ...
                            logger.warning("accept failed (%s)", e)
                            break
                        with conn:
                            ready = [w for w in workers.values() if w.ready]
                            for k in range(len(ready)):
                                if ready[(turn + k) % len(ready)].hand_over(conn):
                                    turn = (turn + k + 1) % max(1, len(ready))
                                    break
                _collect_ready(workers.values())
                for w in _exited(workers):
                    if stopping:
                        codes.append(_clean(w))
                        continue
                    quick = time.monotonic() - w.started < QUICK_DEATH_S
                    quick_deaths = quick_deaths + 1 if quick else 0
                    _note(
                        f"worker {w.index} (pid {w.proc.pid}) exited with code "
                        f"{w.proc.exitcode}; starting another"
                    )
                    if quick_deaths >= QUICK_DEATHS:
                        raise CLIError(
                            f"workers keep exiting right after they start ({quick_deaths} in a "
                            f"row, last code {w.proc.exitcode}); stopping: see the lines above"
                        )
                    workers[w.index] = _Worker(ctx, settings, w.index, folder)
        # stop accepting (new connections are refused), then drain every worker
        sock.close()
        _stop_all(workers.values(), settings.options.request_timeout + 15)
        codes += [_clean(w) for w in workers.values()]
    except BaseException:
        _stop_all(workers.values(), settings.options.request_timeout + 15)
        raise
    finally:
        for w in workers.values():
            w.close()
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(folder, ignore_errors=True)
    _note("stopped")
    return 0 if codes and all(c == 0 for c in codes) else 1


def _stop_all(workers: Any, timeout: float) -> None:
    """SIGTERM to every live worker (each drains), then wait up to ``timeout`` seconds for
    them all; one still running after that is killed."""
    from .server import _note

    workers = list(workers)
    for w in workers:
        if w.proc.is_alive():
            w.proc.terminate()  # SIGTERM
    deadline = time.monotonic() + timeout
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            _note(f"worker {w.index} did not drain in time: killed")
            w.proc.kill()
            w.proc.join()


def _clean(w: _Worker) -> int:
    """A stopped worker's exit code, 0 for one the signal ended before it was ready (it had
    nothing to drain)."""
    code = w.proc.exitcode
    return 0 if code == -signal.SIGTERM and not w.ready else code


def _exited(workers: dict[int, _Worker]) -> list[_Worker]:
    """The workers that have exited (joined, and taken out of ``workers``)."""
    gone = [w for w in workers.values() if not w.proc.is_alive()]
    for w in gone:
        w.proc.join()
        w.close()
        del workers[w.index]
    return gone


def _wait_ready(w: _Worker, stopping: Callable[[], bool]) -> str | None:
    """Block until worker ``w`` says it is ready: None, or the reason it could not start."""
    while not stopping():
        reason = w.poll(0.2)
        if reason is not None:
            return reason
        if w.ready:
            return None
        if not w.proc.is_alive():
            break
    if stopping():
        return None
    w.proc.join()
    return f"worker {w.index} exited with code {w.proc.exitcode} before it was ready"


def _collect_ready(workers: Any) -> None:
    """Replacement workers that became ready take connections from then on."""
    from .server import _note

    for w in workers:
        was_ready = w.ready
        reason = w.poll()
        if reason is not None:
            logger.warning("worker %d could not start: %s", w.index, reason)
        elif w.ready and not was_ready:
            _note(f"worker {w.index} (pid {w.proc.pid}) is ready")
