"""The ``scvi-onnx`` command line: export, embed, score, describe and self-check bundles.

Every command is a thin layer over the Python API (:func:`scvi_onnx.load`, :func:`scvi_onnx.verify`,
:func:`scvi_onnx.bundle.read_manifest`, :func:`scvi_onnx.exporter.export_model`).

Conventions

* stdout carries results only (a metric line, JSON, a table); everything else goes to stderr.
* A user error (bad input, bad bundle, bad argument) prints one line
  ``scvi-onnx: error: <message>`` on stderr and exits 2; ``--debug`` shows the traceback.
* Python warnings print one line each, ``scvi-onnx: warning: <message>``.
* Output files are written to a temporary name in the same folder and renamed when complete;
  an existing output is replaced only with ``--overwrite``.

:func:`main` takes ``argv`` and returns the exit status, so it can be called in-process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from .common import PROG, CLIError, error_message, one_line
from .parser import build_parser


class _Formatter(logging.Formatter):
    """One line per record; a record carrying an exception (a server's internal error) adds
    its traceback below it: the only place an operator can read it."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{PROG}: {record.levelname.lower()}: {one_line(record.getMessage())}"
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _Notes(logging.Handler):
    """Collects the library's notes (records with ``scvi_onnx_note``) for the summary line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        note = getattr(record, "scvi_onnx_note", None)
        if note is not None and note not in self.notes:
            self.notes.append(note)


@contextlib.contextmanager
def _cli_environment(verbose: int) -> Iterator[list[str]]:
    """Logging to stderr and one-line warnings, restored on exit (main is callable in-process).
    Yields the list the library's notes are collected into."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    level = logging.INFO if verbose else logging.WARNING
    handler.setLevel(level)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    package = logging.getLogger("scvi_onnx")
    notes = _Notes()
    old_package_level = package.level
    package.addHandler(notes)
    package.setLevel(logging.INFO)  # notes are INFO records; the stderr handler still filters

    def showwarning(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(f"{PROG}: warning: {one_line(message)}\n")

    try:
        with warnings.catch_warnings():
            warnings.showwarning = showwarning
            yield notes.notes
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        package.removeHandler(notes)
        package.setLevel(old_package_level)


_USER_ERRORS: tuple[type[BaseException], ...] = (CLIError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    from ..errors import ScviOnnxError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    with _cli_environment(args.verbose) as notes:
        args.notes = notes
        try:
            return int(args.func(args))
        except BrokenPipeError:
            # the reader of stdout left (`scvi-onnx info --json | head`): no error line; stdout
            # pointed at devnull so Python's flush at exit does not fail again (Python's docs)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except (ScviOnnxError, *_USER_ERRORS) as e:
            if args.debug:
                raise
            sys.stderr.write(f"{PROG}: error: {error_message(e)}\n")
            return 2
        except KeyboardInterrupt:
            if args.debug:
                raise
            sys.stderr.write(f"{PROG}: error: interrupted\n")
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
