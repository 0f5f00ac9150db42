"""The ``serve`` command's arguments (no server import until the command runs)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..cli.common import CLIError

_DIGEST = re.compile(r"(?:sha256:)?[0-9a-fA-F]{64}")


def _size(text: str) -> int:
    """``67108864``, ``64MiB``, ``64M``, ``1GiB``: a byte count."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"must be a size like 67108864 or 64MiB, got {text!r}")
    unit = (m.group(2) or "B").upper()[:1]
    n = int(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    if n < 1024:
        raise argparse.ArgumentTypeError(f"must be at least 1 KiB, got {text!r}")
    return n


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text!r}")
    return v


def split_digest(text: str) -> tuple[str, str | None]:
    """``PATH@DIGEST`` -> (PATH, DIGEST); a path holding '@' without a digest after it is kept
    whole."""
    path, at, tail = text.rpartition("@")
    if at and _DIGEST.fullmatch(tail):
        return path, tail
    if at and tail.lower().startswith("sha256:"):  # meant as a pin, but not a whole digest
        raise CLIError(
            f"{text}: a pinned digest is sha256: and 64 hex digits (got {len(tail) - 7} "
            f"characters); `scvi-onnx info {path}` prints the bundle's digest"
        )
    return text, None


def add_serve_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    from ..sessions import DEVICES

    p = sub.add_parser(
        "serve",
        parents=parents,
        help="serve bundles over HTTP (Open Inference Protocol / KServe V2)",
        description=(
            "Serve bundles over HTTP with the REST API of the Open Inference Protocol (KServe "
            "V2, as Triton, KServe and Seldon speak it), JSON and binary tensor data. Every "
            "bundle's checksums and self-check must pass before the server listens. Needs the "
            "serve extra: pip install 'scvi-onnx[serve]'. Binds 127.0.0.1 unless --host says "
            "otherwise; use --token-file and TLS for anything beyond this machine."
        ),
    )
    p.add_argument(
        "bundles",
        nargs="*",
        metavar="BUNDLE[@DIGEST]",
        help="bundle folders, served under their folder names; @sha256:... pins the digest "
        "(`scvi-onnx info` shows it)",
    )
    p.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME=PATH[@DIGEST]",
        help="serve PATH as NAME (repeatable; renames a BUNDLE given with the same path)",
    )
    p.add_argument(
        "--expect-digest",
        metavar="DIGEST",
        help="with one bundle: refuse to start unless its digest is DIGEST",
    )
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument(
        "--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)"
    )
    g.add_argument(
        "--token-file",
        metavar="PATH",
        help="require 'Authorization: Bearer <the "
        "token in PATH>' on every route except the two health routes",
    )
    g.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    g.add_argument("--tls-key", metavar="PEM", help="... and this private key")
    g.add_argument(
        "--audit-log",
        metavar="PATH",
        help="append one JSON line per request (time, request id, client, model, version, "
        "outputs, cells, status, duration; never data)",
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-request-bytes",
        type=_size,
        default=64 << 20,
        metavar="SIZE",
        help="largest request body, refused with 413 before it is read (default: 64MiB)",
    )
    g.add_argument(
        "--max-cells",
        type=_positive,
        default=10_000,
        metavar="N",
        help="most cells in one request (default: 10000)",
    )
    g.add_argument(
        "--max-mc-samples",
        type=_positive,
        default=10_000,
        metavar="N",
        help="largest n_mc_samples / mc_samples a request may ask (default: 10000)",
    )
    g.add_argument(
        "--max-concurrency",
        type=_positive,
        default=None,
        metavar="N",
        help="requests computed at once, per worker process (default: the number of CPUs "
        "divided among --workers)",
    )
    g.add_argument(
        "--max-queue",
        type=_positive,
        default=64,
        metavar="N",
        help="requests waiting for a slot; beyond, 503 with Retry-After (default: 64)",
    )
    g.add_argument(
        "--request-timeout",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="time limit of one request, queue included; past it, 504 (default: 60)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="ONNX Runtime device (default: auto, CUDA only when it really works)",
    )
    g.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="server processes sharing the port, each with its own copy of the models "
        "(default: 1; up to the number of CPUs for throughput on large requests)",
    )
    g.add_argument(
        "--threads",
        type=_positive,
        default=None,
        metavar="N",
        help="the library's worker threads per request (default: the number of CPUs, at "
        "most 8, divided among --workers); results do not depend on it",
    )
    p.set_defaults(func=cmd_serve)


def bundle_specs(args: argparse.Namespace) -> list:
    from .models import bundle_name, check_name
    from .server import BundleSpec

    specs: list[BundleSpec] = []
    for text in args.bundles:
        path, digest = split_digest(text)
        specs.append(BundleSpec(bundle_name(path), Path(path), digest))
    for text in args.name:
        name, eq, rest = text.partition("=")
        if not eq or not name or not rest:
            raise CLIError(f"--name must be NAME=PATH[@DIGEST], got {text!r}")
        path, digest = split_digest(rest)
        resolved = Path(path).resolve()
        same = [i for i, s in enumerate(specs) if s.path.resolve() == resolved]
        spec = BundleSpec(name, Path(path), digest)
        if same:
            old = specs[same[0]]
            specs[same[0]] = BundleSpec(name, old.path, digest or old.digest)
        else:
            specs.append(spec)
    if not specs:
        raise CLIError("give at least one bundle to serve (BUNDLE or --name NAME=PATH)")
    if args.expect_digest:
        if len(specs) != 1:
            raise CLIError("--expect-digest pins one bundle; with several use NAME=PATH@DIGEST")
        specs[0] = BundleSpec(specs[0].name, specs[0].path, args.expect_digest)
    names = [check_name(s.name) for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CLIError(
            f"two bundles would be served as {', '.join(dup)}; name them with --name NAME=PATH"
        )
    return specs


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import ServeOptions
    from .models import Limits
    from .server import cpu_count, serve

    specs = bundle_specs(args)
    # the CPUs divided among the worker processes (each at least one thread and one slot)
    share = max(1, cpu_count() // args.workers)
    limits = Limits(
        max_cells=args.max_cells,
        max_mc_samples=args.max_mc_samples,
        max_request_bytes=args.max_request_bytes,
        workers=args.workers,
    )
    options = ServeOptions(
        max_request_bytes=args.max_request_bytes,
        max_concurrency=args.max_concurrency or share,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
    )
    return serve(
        specs,
        host=args.host,
        port=args.port,
        device=args.device,
        n_threads=args.threads or (share if args.workers > 1 else None),
        limits=limits,
        options=options,
        token_file=args.token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        audit_log=args.audit_log,
        workers=args.workers,
    )
