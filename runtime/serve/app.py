"""The HTTP application: the REST routes of the Open Inference Protocol over served models.

Routes (each also under ``/v2/models/{name}/versions/{version}/...``):

==========================================  =====================================================
``GET  /v2/health/live``                    200 while the process serves (no token needed)
``GET  /v2/health/ready``                   200 once every bundle passed its checks, 503 while
                                            draining (no token needed)
``GET  /v2``                                server metadata
``GET  /v2/models``                         the served models (name, versions, ready)
``GET  /v2/models/{name}``                  model metadata (inputs, outputs, genes, digest)
``GET  /v2/models/{name}/ready``            200 when the model is ready
``POST /v2/models/{name}/infer``            inference (JSON or binary tensor data)
``GET  /metrics``                           Prometheus text format
==========================================  =====================================================

Safety: the body is refused with 413 from its ``Content-Length`` before it is read, and while
it streams; inference runs on a bounded pool of worker threads behind a bounded queue (a full
queue is a 503 with ``Retry-After``); a request that runs past the time limit gets 504; every
error is ``{"error": "..."}`` with the library's typed message, never a traceback. With a token,
every route but the two health routes needs ``Authorization: Bearer <token>``, compared in
constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..errors import ScviOnnxError
from .models import Prepared, ServedModel
from .observe import AuditLog, Metrics, RequestRecord, SharedMetrics
from .protocol import HEADER_LENGTH, InferRequest, ProtocolError, parse_request

logger = logging.getLogger("scvi_onnx.serve")

HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
#: Seconds a client is told to wait when the queue is full.
RETRY_AFTER_S = 1
#: Bodies up to this size are decoded on the event loop to see whether they can be batched.
BATCH_BODY_BYTES = 256 << 10
#: Status recorded for a client that went away before its response (nginx's convention).
CLIENT_CLOSED = 499


@dataclass(frozen=True)
class ServeOptions:
    """The server's limits and security settings (see ``scvi-onnx serve --help``)."""

    max_request_bytes: int = 64 << 20
    max_concurrency: int = 2
    max_queue: int = 64
    request_timeout: float = 60.0
    token: str | None = None


class _Refusal(Exception):
    """An HTTP error answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _status_name(status: int) -> str:
    """An HTTP status as an error class name for the audit log (404: ``NotFound``)."""
    try:
        return HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    except ValueError:
        return f"HTTP{status}"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _bad_input(rec: RequestRecord, e: Exception) -> JSONResponse:
    """400 with the library's (or the protocol's) typed message."""
    rec.error = type(e).__name__
    return JSONResponse({"error": str(e), "error_type": type(e).__name__}, status_code=400)


def _internal_error(rec: RequestRecord, e: Exception) -> JSONResponse:
    """500 naming the request; the traceback goes to the server's log only."""
    rec.error = type(e).__name__
    logger.error("request %s failed", rec.request_id, exc_info=e)
    return _error(500, f"internal error (request {rec.request_id}); see the server log")


class InferenceServer:
    """The served models and what every request shares: limits, queue, worker threads,
    audit log and metrics. :attr:`app` is the ASGI application."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        options: ServeOptions,
        audit: AuditLog | None = None,
        shared: SharedMetrics | None = None,
    ):
        self.models = models
        self.options = options
        self.audit = audit
        self.metrics = Metrics()
        self.shared = shared  # one worker process of several: metrics summed over them
        self.ready = True
        self._token = options.token.encode() if options.token else None
        self.executor = ThreadPoolExecutor(
            options.max_concurrency, thread_name_prefix="scvi-onnx-infer"
        )
        # requests that must wait for a worker are decoded and checked meanwhile (_screen;
        # decoding holds the interpreter lock: more threads would not decode faster)
        self.decoders = ThreadPoolExecutor(
            min(2, options.max_concurrency), thread_name_prefix="scvi-onnx-decode"
        )
        self._slots: asyncio.Semaphore | None = None
        self._batchers: dict[str, _Batcher] = {}
        self.app = _Guard(self._starlette(), self)

    # ------------------------------------------------------------------ routes
    def _starlette(self) -> Starlette:
        routes = [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.server_ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/models", self.model_index, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ]
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                Route(prefix, self.model_metadata, methods=["GET"]),
                Route(prefix + "/ready", self.model_ready, methods=["GET"]),
                Route(prefix + "/infer", self.infer, methods=["POST"]),
            ]

        async def http_error(request: Request, exc: HTTPException) -> Response:
            return _error(exc.status_code, exc.detail or "error", getattr(exc, "headers", None))

        async def internal(request: Request, exc: Exception) -> Response:
            logger.error("unhandled error on %s", request.url.path, exc_info=exc)
            return _error(500, "internal server error; see the server log")

        return Starlette(
            routes=routes, exception_handlers={HTTPException: http_error, Exception: internal}
        )

    def _record(self, request: Request, route: str) -> RequestRecord:
        rec: RequestRecord = request.scope["scvi_onnx.record"]
        rec.route = route
        return rec

    def _model(self, request: Request, rec: RequestRecord) -> ServedModel:
        name = request.path_params["name"]
        rec.model = name[:200]
        served = self.models.get(name)
        if served is None:
            raise _Refusal(
                404,
                f"unknown model {name!r}; this server serves {', '.join(map(repr, self.models))}",
            )
        rec.version = served.version
        version = request.path_params.get("version")
        if version is not None and version != served.version:
            raise _Refusal(
                404,
                f"model {name!r} has no version {version!r}; it serves version "
                f"{served.version!r} (digest {served.digest})",
            )
        return served

    async def live(self, request: Request) -> Response:
        self._record(request, "health_live")
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        self._record(request, "health_ready")
        if not self.ready:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        self._record(request, "server_metadata")
        return JSONResponse(
            {"name": "scvi-onnx", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    async def model_index(self, request: Request) -> Response:
        self._record(request, "model_index")
        return JSONResponse(
            {
                "models": [
                    {"name": m.name, "versions": [m.version], "digest": m.digest, "ready": True}
                    for m in self.models.values()
                ]
            }
        )

    async def metrics_text(self, request: Request) -> Response:
        self._record(request, "metrics")
        models = [(m.name, m.version, self.ready) for m in self.models.values()]
        metrics = self.metrics
        if self.shared is not None:
            metrics = metrics.combined(self.shared.others())
        return Response(
            metrics.render(models), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def model_metadata(self, request: Request) -> Response:
        rec = self._record(request, "model_metadata")
        try:
            served = self._model(request, rec)
        except _Refusal as r:
            return _error(r.status, str(r))
        return Response(served.metadata_json, media_type="application/json")

    async def model_ready(self, request: Request) -> Response:
        rec = self._record(request, "model_ready")
        try:
            served = self._model(request, rec)
        except _Refusal as r:
            return _error(r.status, str(r))
        if not self.ready:
            return JSONResponse({"name": served.name, "ready": False}, status_code=503)
        return JSONResponse({"name": served.name, "ready": True})

    # ------------------------------------------------------------------ inference
    async def _body(self, request: Request, header_length: int | None) -> memoryview:
        """The request body, refused with 413 past the limit: from Content-Length before
        anything is read, and while it streams (chunked or compressed bodies).

        With a known length the body is read into one buffer placed so that the binary
        tensors after the JSON header start 16-byte aligned: numpy reads them in place
        (unaligned float32 made the library ~25% slower on 1,000-cell requests)."""
        limit = self.options.max_request_bytes
        too_big = (
            f"request body larger than this server accepts ({limit} bytes, "
            "--max-request-bytes); send fewer cells per request"
        )
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise _Refusal(400, f"invalid Content-Length {length[:40]!r}")
            if int(length) > limit:
                raise _Refusal(413, too_big, {"Connection": "close"})
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", "gzip", "deflate"):
            raise _Refusal(415, f"unsupported Content-Encoding {encoding[:40]!r}")
        inflate = None
        if encoding != "identity":
            inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        elif length is not None:
            return await self._body_into(request, int(length), header_length or 0)
        buf = bytearray()
        try:
            async for chunk in request.stream():
                if inflate is not None and chunk:
                    # bounded: never inflate more than the limit (a small compressed body
                    # must not become gigabytes)
                    chunk = inflate.decompress(chunk, limit + 1 - len(buf))
                    if inflate.unconsumed_tail:
                        raise _Refusal(413, too_big, {"Connection": "close"})
                buf += chunk
                if len(buf) > limit:
                    raise _Refusal(413, too_big, {"Connection": "close"})
        except zlib.error as e:
            raise _Refusal(400, f"the body is not valid {encoding} data ({e})") from None
        return memoryview(buf)

    async def _body_into(self, request: Request, length: int, header_length: int) -> memoryview:
        pad = -header_length % 16
        buf = bytearray(pad + length)
        view = memoryview(buf)
        pos = pad
        async for chunk in request.stream():
            end = pos + len(chunk)
            if end > pad + length:
                raise _Refusal(400, f"the body is longer than its Content-Length ({length})")
            view[pos:end] = chunk
            pos = end
        if pos != pad + length:
            raise _Refusal(400, f"the body ended after {pos - pad} of {length} bytes")
        return view[pad:]

    async def infer(self, request: Request) -> Response:
        rec = self._record(request, "infer")
        watchers: list[asyncio.Task] = []  # the connection's watcher, once the body is read
        try:
            return await self._infer(request, rec, watchers)
        finally:
            for task in watchers:
                task.cancel()

    async def _infer(
        self, request: Request, rec: RequestRecord, watchers: list[asyncio.Task]
    ) -> Response:
        loop = asyncio.get_running_loop()
        opts = self.options
        try:
            served = self._model(request, rec)
            if not self.ready:
                raise _Refusal(503, "the server is shutting down", {"Retry-After": "1"})
            if self.metrics.queued >= opts.max_queue:
                raise _Refusal(
                    503,
                    f"the server is busy ({opts.max_concurrency} requests running, "
                    f"{opts.max_queue} waiting); retry after {RETRY_AFTER_S} s",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
            deadline = loop.time() + opts.request_timeout
            self.metrics.queued += 1
            self._gauges_changed()
            handed_over = False
            try:
                header_length = request.headers.get(HEADER_LENGTH.lower())
                if header_length is not None:
                    if not header_length.isdigit():
                        raise _Refusal(400, f"invalid {HEADER_LENGTH} {header_length[:40]!r}")
                    header_length = int(header_length)
                body = await self._body(request, header_length)
                # the body is read: the next message can only say that the client went away
                gone = loop.create_task(_client_gone(request.receive))
                watchers.append(gone)  # cancelled by infer() on every exit
                if self._slots is None:
                    self._slots = asyncio.Semaphore(opts.max_concurrency)
                try:
                    batch, req, prepared = await self._screen(
                        served, body, header_length, gone, deadline
                    )
                except (ProtocolError, ScviOnnxError) as e:
                    if gone.done():  # left while it was decoded: answered to nobody
                        raise ClientDisconnect() from None
                    # refused without waiting for a worker (the message infer gives)
                    return _bad_input(rec, e)
                except (_Refusal, ClientDisconnect):
                    raise
                except Exception as e:  # a bug: as on a worker, logged here, never sent
                    return _internal_error(rec, e)
                if req is not None or prepared is not None or batch is not None:
                    # what is decoded holds what it needs of the body (binary tensors are
                    # views of it); a JSON body is not kept while the request waits
                    body = None
                if batch is not None:
                    # computed with the concurrent requests of the same kind, in one library
                    # call (the batcher takes it off the queue when its batch starts)
                    future = self._batcher(served).submit(*batch)
                    handed_over = True
                else:
                    held = False  # a request whose time ran out (reading, decoding) takes none
                    if loop.time() < deadline:
                        acquire = loop.create_task(self._slots.acquire())
                        await asyncio.wait(
                            (acquire, gone),
                            timeout=max(0.0, deadline - loop.time()),
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        acquire.cancel()  # nothing when it has its slot already
                        try:
                            held = await acquire
                        except asyncio.CancelledError:
                            held = False
                    if gone.done():  # left while queued: nothing is computed for it
                        if held:
                            self._slots.release()
                        raise ClientDisconnect()
                    if not held:
                        raise self._not_taken()
            finally:
                if not handed_over:
                    self.metrics.queued -= 1
                    self._gauges_changed()
        except _Refusal as r:
            return _error(r.status, str(r), r.headers)
        except ClientDisconnect:
            rec.error = "ClientDisconnect"
            return Response(status_code=CLIENT_CLOSED)

        if batch is None:
            self.metrics.in_flight += 1
            self._gauges_changed()
            if prepared is not None:
                future = loop.run_in_executor(self.executor, served.run, prepared)
            else:
                future = loop.run_in_executor(self.executor, _run, served, req, body, header_length)

            def finished(f: asyncio.Future) -> None:
                # the slot is held until the computation really ends, even past a 504
                self._slots.release()
                self.metrics.in_flight -= 1
                self._gauges_changed()
                if not f.cancelled():
                    f.exception()  # retrieved: a 504's late error is not reported as unhandled

            future.add_done_callback(finished)
        try:
            await asyncio.wait(
                (future, gone),
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            left, late = gone.done(), not future.done()
            if (left or late) and batch is not None:
                future.cancel()  # answered without it: the batcher leaves it out if it can
            if left:  # computed for nobody: say so in the audit log now
                rec.error = "ClientDisconnect"
                return Response(status_code=CLIENT_CLOSED)
            if late:
                rec.error = "Timeout"
                return _error(
                    504,
                    f"the request took longer than this server allows "
                    f"({opts.request_timeout:g} s, --request-timeout); send fewer cells or "
                    "samples per request",
                )
            result = future.result()
        except (ProtocolError, ScviOnnxError) as e:
            return _bad_input(rec, e)
        except Exception as e:  # a bug or resource failure: logged here, never sent
            return _internal_error(rec, e)
        rec.n_cells, rec.outputs = result.n_cells, result.outputs
        headers = {}
        if result.header_length is not None:
            headers[HEADER_LENGTH] = str(result.header_length)
        media = "application/octet-stream" if result.header_length is not None else None
        return Response(result.body, headers=headers, media_type=media or "application/json")

    async def _screen(
        self,
        served: ServedModel,
        body: memoryview,
        header_length: int | None,
        gone: asyncio.Task,
        deadline: float,
    ) -> tuple[tuple | None, InferRequest | None, Prepared | None]:
        """Decode and check what can be before a request waits for a worker: ``(batch, req,
        prepared)``, at most one of them set.

        - A small body (<= 256 KiB) is decoded here on the event loop (a single cell decodes
          in ~15 us): a malformed one raises at once; one that can share a library call gives
          ``batch`` (``(batch key, decoded request)``), another ``req``.
        - Where every worker is busy (the request would wait), a request not yet batched is
          prepared (:meth:`ServedModel.prepare`) on the decoding threads meanwhile:
          ``prepared``, or what is wrong with it before the library's methods (an unknown
          parameter, output or input, a wrong shape, a limit) raised at once, with the message
          the same code gives on a worker, not after the requests in flight. Not a larger
          body all JSON: decoded, its numbers take 2-4x the body's bytes (a "0," becomes 4 or
          8 bytes), which the queue would hold for every such request waiting.
        - Where a worker is free, the worker decodes and prepares it: nothing to wait for,
          and no hop between threads (measured: decoding a 1,000-cell binary request on
          another thread first cost ~3 ms of CPU per request and took 2 workers' UINT16
          requests at concurrency 2 from 1.01x to 0.82x of the library in-process).

        A request whose client leaves (``gone``) or whose ``deadline`` passes while it is
        decoded on a decoding thread is not waited for (:class:`ClientDisconnect`, a 503): it
        would otherwise take the next free worker for nobody.

        Raises :class:`ProtocolError` or :class:`~scvi_onnx.errors.ScviOnnxError`."""
        req = None
        if len(body) <= BATCH_BODY_BYTES:
            req = parse_request(body, header_length)
            try:
                key = served.batch_key(req)
            except Exception:  # the single-request path reports what is wrong
                key = None
            if key is not None:
                return (key, req), None, None
        if not self._slots.locked() or (req is None and header_length is None):
            return None, req, None
        loop = asyncio.get_running_loop()
        decoding = loop.run_in_executor(self.decoders, _prepare, served, req, body, header_length)
        await asyncio.wait(
            (decoding, gone),
            timeout=max(0.0, deadline - loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if gone.done() or not decoding.done():
            # its outcome is not wanted (a decoding still running ends on its thread)
            decoding.add_done_callback(lambda f: f.cancelled() or f.exception())
            if gone.done():
                raise ClientDisconnect()
            raise self._not_taken()
        return None, None, decoding.result()

    def _not_taken(self) -> _Refusal:
        """A request whose time ran out before a worker took it (queued, read or decoded):
        503, retry later; it is never computed."""
        return _Refusal(
            503,
            f"no worker took the request within the server's time limit "
            f"({self.options.request_timeout:g} s, --request-timeout, queue included); "
            "retry later",
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    def _batcher(self, served: ServedModel) -> _Batcher:
        b = self._batchers.get(served.name)
        if b is None:
            b = self._batchers[served.name] = _Batcher(self, served)
        return b

    def _gauges_changed(self) -> None:
        """Requests queued or in flight changed (on the event loop): other worker processes
        of the server see it on /metrics within a quarter of a second."""
        if self.shared is not None:
            self.shared.changed(self.metrics, asyncio.get_running_loop())

    def close(self) -> None:
        self.decoders.shutdown(wait=True)
        self.executor.shutdown(wait=True)
        if self.shared is not None:
            self.shared.write(self.metrics)
        if self.audit is not None:
            self.audit.close()


class _Batcher:
    """Dynamic batching of one model's small requests (as Triton's dynamic batcher): requests
    that arrive while the workers are busy wait here, and the next free worker computes all
    those of one kind in one library call (see :meth:`ServedModel.batch_key` for which
    requests, and why each gets exactly the numbers it would get alone)."""

    def __init__(self, server: InferenceServer, served: ServedModel):
        self.server = server
        self.served = served
        self.pending: dict[tuple, list[tuple[Any, asyncio.Future]]] = {}
        self.task: asyncio.Task | None = None

    def submit(self, key: tuple, req: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.pending.setdefault(key, []).append((req, future))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._drain())
        return future

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        """The oldest kind's waiting requests, up to --max-cells cells."""
        key = next(iter(self.pending))
        items = self.pending[key]
        taken, cells = [], 0
        while items:
            n = items[0][0].inputs["counts"].shape[0]
            if taken and cells + n > self.served.limits.max_cells:
                break
            taken.append(items.pop(0))
            cells += n
        if not items:
            del self.pending[key]
        return taken

    async def _drain(self) -> None:
        server = self.server
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                await server._slots.acquire()
                if not self.pending:
                    server._slots.release()
                    break
                taken = self._take()
                server.metrics.queued -= len(taken)
                items = [(r, f) for r, f in taken if not f.done()]
                if not items:
                    server._slots.release()
                    continue
                server.metrics.in_flight += len(items)
                server.metrics.batches += 1
                server.metrics.batched_requests += len(items)
                server._gauges_changed()
                job = loop.run_in_executor(
                    server.executor, self.served.infer_batch, [r for r, _ in items]
                )
                job.add_done_callback(lambda j, items=items: self._done(j, items))
        finally:
            self.task = None

    def _done(self, job: asyncio.Future, items: list[tuple[Any, asyncio.Future]]) -> None:
        self.server._slots.release()
        self.server.metrics.in_flight -= len(items)
        self.server._gauges_changed()
        if job.cancelled():
            outcomes: list = [RuntimeError("the batch was cancelled")] * len(items)
        elif job.exception() is not None:
            outcomes = [job.exception()] * len(items)
        else:
            outcomes = job.result()
        for (_, f), outcome in zip(items, outcomes, strict=True):
            if f.done():
                continue
            if isinstance(outcome, BaseException):
                f.set_exception(outcome)
            else:
                f.set_result(outcome)
            f.add_done_callback(lambda x: x.cancelled() or x.exception())


async def _client_gone(receive: Any) -> None:
    """Returns when the client closes its connection. Only called once the request's body is
    read, so the server reads the socket while it computes; uvicorn stops reading a large body
    it buffered, and would not see the close until the response is written."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _decoded(req: InferRequest | None, body: memoryview, header_length: int | None):
    """``req``, or the request decoded from ``body`` where the event loop did not decode it."""
    return req if req is not None else parse_request(body, header_length)


def _prepare(
    served: ServedModel, req: Any, body: memoryview, header_length: int | None
) -> Prepared:
    """On a decoding thread: decode the request (unless ``req`` is) and check it."""
    return served.prepare(_decoded(req, body, header_length))


def _run(served: ServedModel, req: Any, body: memoryview, header_length: int | None):
    """On a worker thread: decode the request (unless ``req`` is), check and compute it."""
    return served.infer(_decoded(req, body, header_length))


class _Guard:
    """The outer ASGI layer: request id, authentication, audit log and metrics for every
    HTTP request, whatever route (or none) answers it."""

    def __init__(self, app: Any, server: InferenceServer):
        self.app = app
        self.server = server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        rec = RequestRecord(
            request_id=uuid.uuid4().hex,
            client=f"{client[0]}:{client[1]}" if client else "",
            method=scope.get("method", ""),
            route="unknown",
            worker=None if self.server.shared is None else self.server.shared.index,
        )
        scope["scvi_onnx.record"] = rec
        path = scope.get("path", "")

        async def send_recorded(message: dict) -> None:
            if message["type"] == "http.response.start":
                rec.status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rec.request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if self.server._token is not None and path not in HEALTH_PATHS:
                if not self._authorized(scope):
                    rec.route = "auth"
                    rec.error = "Unauthorized"
                    response = _error(
                        401,
                        "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                        {"WWW-Authenticate": 'Bearer realm="scvi-onnx"'},
                    )
                    await response(scope, receive, send_recorded)
                    return
            await self.app(scope, receive, send_recorded)
        finally:
            if rec.status == 0:
                rec.status = CLIENT_CLOSED
            if rec.status == 404 and rec.route == "unknown":
                rec.route = "not_found"
            if rec.status >= 400 and rec.error is None:  # a refusal without an error type
                rec.error = _status_name(rec.status)
            self.server.metrics.observe(rec)
            self.server._gauges_changed()  # and the counters
            if self.server.audit is not None and path not in HEALTH_PATHS:
                self.server.audit.write(rec)

    def _authorized(self, scope: dict) -> bool:
        value = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                value = v
                break
        scheme, _, token = value.partition(b" ")
        # compare_digest on equal-length inputs only leaks the length of the expected token,
        # and nothing on unequal ones beyond that they differ
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            token.strip(), self.server._token
        )
