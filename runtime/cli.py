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

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

PROG = "scvi-onnx"
EXPORT_HINT = "pip install 'scvi-onnx[export]'"
DEVICES = ("auto", "cpu", "cuda")
LATENT_SUFFIXES = (".h5ad", ".npy", ".csv")
PREDICT_SUFFIXES = (".csv", ".h5ad")
PER_CELL_SUFFIXES = (".csv", ".npy")
_N_PREVIEW = 5

logger = logging.getLogger("scvi_onnx.cli")


class CLIError(Exception):
    """A user error: reported as one ``scvi-onnx: error:`` line, exit status 2."""


# ============================================================================================
# small helpers
# ============================================================================================
def _one_line(text: Any) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
        return f"{exc.filename}: {exc.strerror}"
    msg = _one_line(exc)
    # The library's messages name Python keywords; say the command-line flags instead.
    for kw, flag in _FLAG_NAMES:
        msg = msg.replace(kw, flag)
    return msg or type(exc).__name__


_FLAG_NAMES = (
    ('missing_genes="zero"', "--missing-genes zero"),
    ("min_gene_overlap=0", "--min-gene-overlap 0"),
    ("min_gene_overlap", "--min-gene-overlap"),
    ("batch_size", "--batch-size"),
    ("n_mc_samples", "--n-mc-samples"),
)


def _preview(items: Any, n: int = _N_PREVIEW) -> str:
    items = [str(x) for x in items]
    head = ", ".join(items[:n])
    return head + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats (not valid JSON) with None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(_json_safe(obj), indent=1, allow_nan=False))


# ============================================================================================
# argument types and the parser
# ============================================================================================
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage stays available with --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="log progress messages (INFO) to stderr",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the full traceback of any error",
    )


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="ONNX Runtime device; auto uses CUDA only when it really works (default: auto)",
    )


def _data_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and data options")
    _device_option(g)
    g.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="seed of the Monte-Carlo draws; same seed, same numbers (default: 0)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="cells per minibatch: memory only, results do not depend on it (default: 128)",
    )
    g.add_argument(
        "--missing-genes",
        choices=("error", "zero"),
        default="error",
        help="genes of the model absent from the input: fail (default) or fill with zeros",
    )
    g.add_argument(
        "--min-gene-overlap",
        type=float,
        default=0.8,
        metavar="F",
        help="with --missing-genes zero: smallest fraction of the model's genes that must be "
        "present (default 0.8, as scvi-tools; 0 accepts any overlap)",
    )
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is shown on stderr only when stderr is a terminal)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace output files that already exist"
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description=(
            "Run trained scvi-tools SCVI models without torch: export a model to an ONNX "
            "bundle, then embed and score cells with onnxruntime + numpy."
        ),
        epilog=(
            "examples:\n"
            "  scvi-onnx export my_scvi_model/ my_bundle/        (needs "
            f"{EXPORT_HINT})\n"
            "  scvi-onnx info my_bundle/\n"
            "  scvi-onnx verify my_bundle/\n"
            "  scvi-onnx latent my_bundle/ query.h5ad -o query_latent.h5ad\n"
            "  scvi-onnx elbo my_bundle/ query.h5ad --json\n"
            "\nRun 'scvi-onnx COMMAND --help' for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _global_options(parser, default=None)
    parser.set_defaults(verbose=0, debug=False)

    common = _Parser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ------------------------------------------------------------------ export
    p = sub.add_parser(
        "export",
        parents=[common],
        help="export a saved scvi-tools model folder to a bundle",
        description=(
            "Export a saved scvi-tools SCVI model (the folder written by model.save(), holding "
            "model.pt) to a scvi-onnx bundle folder. The graphs are validated against the "
            f"torch modules before the bundle is written. Needs the export extra: {EXPORT_HINT}. "
            "model.pt is a pickle: export only folders you trust."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="saved scvi-tools model folder")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder to write")
    p.add_argument(
        "--adata",
        metavar="H5AD",
        help="AnnData to load the model with (optional; the saved registry is enough)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing BUNDLE")
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="seed of the validation probes (default: 0)",
    )
    p.set_defaults(func=cmd_export)

    # ------------------------------------------------------------------ latent
    p = sub.add_parser(
        "latent",
        parents=[common],
        help="latent representation of cells (to .h5ad, .npy or .csv)",
        description=(
            "Compute the latent representation of the cells of IN.h5ad (genes are matched by "
            "name), as SCVI.get_latent_representation. The format of OUT follows its "
            "extension: .h5ad = a copy of the input with the latent in obsm[KEY]; .npy = the "
            "(cells x latent) array; .csv = a table indexed by obs_names with columns "
            "latent_0 .. latent_{L-1}."
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder")
    p.add_argument("input", metavar="IN.h5ad", help="input AnnData (.h5ad)")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output file: .h5ad, .npy or .csv",
    )
    p.add_argument(
        "--key",
        default="X_scVI",
        help="obsm key of the latent in an .h5ad output (default: X_scVI)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--return-dist",
        action="store_true",
        help=(
            "write the posterior mean and variance: obsm[KEY] and obsm[KEY_var] (.h5ad), or "
            "extra columns latent_var_* (.csv); not for .npy"
        ),
    )
    mode.add_argument(
        "--sample",
        action="store_true",
        help="one posterior draw per cell instead of the posterior mean (give_mean=False)",
    )
    p.add_argument(
        "--mc-samples",
        type=_positive_int,
        default=5000,
        metavar="N",
        help="draws of the posterior mean for a logistic-normal latent (default: 5000)",
    )
    _data_options(p)
    p.set_defaults(func=cmd_latent)

    # ------------------------------------------------------------------ predict (SCANVI)
    p = sub.add_parser(
        "predict",
        parents=[common],
        help="cell labels from a SCANVI bundle (to .csv or .h5ad)",
        description=(
            "Predict cell labels with a SCANVI bundle's classifier, as SCANVI.predict. "
            ".csv = a table indexed by obs_names with the predicted label (and, with --soft, "
            "one probability column per label); .h5ad = a copy of the input with "
            "obs[KEY] (and, with --soft, obsm[KEY_probabilities])."
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="SCANVI bundle folder")
    p.add_argument("input", metavar="IN.h5ad", help="input AnnData (.h5ad)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output: .csv or .h5ad")
    p.add_argument("--soft", action="store_true", help="also write the label probabilities")
    p.add_argument(
        "--key",
        default="scanvi_prediction",
        help="obs key of the labels in an .h5ad output (default: scanvi_prediction)",
    )
    _data_options(p)
    p.set_defaults(func=cmd_predict)

    # ------------------------------------------------------------------ metrics
    metrics = (
        (
            "elbo",
            "evidence lower bound (higher is better)",
            "Mean evidence lower bound of the cells, as SCVI.get_elbo (one posterior draw "
            "per cell).",
        ),
        (
            "reconstruction-error",
            "reconstruction loss -log p(x|z,l) (lower is better)",
            "Mean reconstruction loss -log p(x | z, l) of the cells, as "
            "SCVI.get_reconstruction_error (one posterior draw per cell).",
        ),
        (
            "marginal-ll",
            "importance-sampled marginal log-likelihood",
            "Importance-sampled marginal log-likelihood, as SCVI.get_marginal_ll. The printed "
            "value is scvi-tools' reduction: the mean over minibatches of per-minibatch means.",
        ),
    )
    for name, short, long in metrics:
        p = sub.add_parser(
            name,
            parents=[common],
            help=short,
            description=(
                f"{long} Prints one line 'NAME: VALUE' on stdout, or a JSON object with --json."
            ),
        )
        p.add_argument("bundle", metavar="BUNDLE", help="bundle folder")
        p.add_argument("input", metavar="IN.h5ad", help="input AnnData (.h5ad)")
        if name == "marginal-ll":
            p.add_argument(
                "--n-mc-samples",
                type=_positive_int,
                default=1000,
                metavar="N",
                help="importance samples per cell (default: 1000)",
            )
        p.add_argument(
            "--json",
            action="store_true",
            help="print a JSON object (metric, value, n_cells, bundle, provider, seed)",
        )
        p.add_argument(
            "--per-cell",
            metavar="OUT",
            help="also write the per-cell values: .csv (indexed by obs_names) or .npy",
        )
        _data_options(p)
        p.set_defaults(func=cmd_metric, metric_command=name)

    # ------------------------------------------------------------------ info
    p = sub.add_parser(
        "info",
        parents=[common],
        help="describe a bundle (model, genes, covariates, versions, files)",
        description=(
            "Describe a bundle: model class and architecture, genes, likelihood, the obs "
            "columns the input needs (batch, labels, covariates), versions and files. File "
            "checksums are checked and reported (a tampered file does not stop the report)."
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_info)

    # ------------------------------------------------------------------ verify
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="re-run the bundle's probe cells here and compare with torch",
        description=(
            "Self-check a bundle on this machine: run its graphs on the probe cells stored at "
            "export and compare every output with scvi-tools' torch outputs, within the "
            "stored tolerance |onnx - torch| <= atol + rtol * |torch|. Exit status 0 when "
            "every output passes, 1 when one fails, 2 when the bundle cannot be read."
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder")
    _device_option(p)
    p.add_argument("--json", action="store_true", help="print the report as a JSON object")
    p.set_defaults(func=cmd_verify)
    return parser


# ============================================================================================
# input and output files
# ============================================================================================
def _check_input(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"input file not found: {p}")
    if not p.is_file():
        raise CLIError(f"input {p} is not a file; pass an .h5ad file")
    return p


def _read_h5ad(path: str, *, backed: bool):
    """Read an AnnData; any failure to read is a one-line error (and only that line)."""
    p = _check_input(path)
    import anndata

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # anndata's own chatter about the file's encoding is not the user's problem
        warnings.simplefilter("ignore", FutureWarning)
        # duplicated gene names are refused with a clearer error when the data is used
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        try:
            adata = anndata.read_h5ad(p, backed="r" if backed else None)
        except Exception as e:
            # the warnings of a failed read are dropped: the error line says it all
            raise CLIError(
                f"cannot read {p} as an .h5ad file: {_error_message(e)}; pass an AnnData file "
                "written by anndata (AnnData.write_h5ad)"
            ) from e
    seen = set()
    for w in caught:  # re-emit once each, as the default warning filter would
        key = (w.category, str(w.message))
        if key not in seen:
            seen.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return adata


def _close(adata: Any) -> None:
    f = getattr(adata, "file", None)
    if f is not None and getattr(adata, "isbacked", False):
        with contextlib.suppress(Exception):
            f.close()


def _check_output(path: str, suffixes: tuple[str, ...], what: str, *, overwrite: bool) -> Path:
    """Refuse an output path early (bad extension, existing file, missing folder)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in suffixes:
        raise CLIError(
            f"unsupported {what} extension {p.suffix or '(none)'!r} in {p}; "
            f"use one of {', '.join(suffixes)}"
        )
    if p.is_dir():
        raise CLIError(f"output {p} is a folder; pass a file name")
    if p.exists() and not overwrite:
        raise CLIError(f"output {p} exists; pass --overwrite to replace it")
    parent = p.parent
    if not parent.is_dir():
        raise CLIError(f"output folder {parent} does not exist")
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, write: Callable[[Path], None], *, overwrite: bool) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs are normal files
        if path.exists() and not overwrite:
            raise CLIError(f"output {path} exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    logger.info("wrote %s", path)


def _save_npy(arr: Any) -> Callable[[Path], None]:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    return write


def _save_csv(frame: Any) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        frame.to_csv(tmp)

    return write


def _frame(values: Any, obs_names: Any, columns: list[str]):
    import pandas as pd

    index = pd.Index([str(x) for x in obs_names], name=obs_names.name or "cell")
    return pd.DataFrame(values, index=index, columns=columns)


# ============================================================================================
# commands
# ============================================================================================
def _load_model(args: argparse.Namespace):
    from . import load

    return load(args.bundle, device=args.device, seed=args.seed)


def _progress(args: argparse.Namespace) -> bool:
    if args.no_progress:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _data_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "batch_size": args.batch_size,
        "seed": args.seed,
        "missing_genes": args.missing_genes,
        "min_gene_overlap": args.min_gene_overlap,
        "progress_bar": _progress(args),
    }


def _note_overlap(model, adata, args: argparse.Namespace) -> None:
    """Report zero-filled genes (the data layer refuses below --min-gene-overlap)."""
    if args.missing_genes != "zero":
        return
    ov = model.gene_overlap(adata)
    if ov["fraction"] >= args.min_gene_overlap and ov["n_found"] < ov["n_model_genes"]:
        sys.stderr.write(
            f"{PROG}: note: {ov['n_found']} of {ov['n_model_genes']} model genes found "
            f"({100 * ov['fraction']:.1f}%); {len(ov['missing'])} filled with zeros\n"
        )


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.bundle)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    try:
        from .exporter import export_model
    except ImportError as e:
        msg = _one_line(e)
        if EXPORT_HINT not in msg:
            msg = f"export needs torch, scvi-tools and onnx ({msg}): {EXPORT_HINT}"
        raise CLIError(msg) from e
    adata = _read_h5ad(args.adata, backed=False) if args.adata else None
    # scvi-tools and lightning print to stdout while loading; stdout is for results
    with contextlib.redirect_stdout(sys.stderr):
        path = export_model(
            args.model_dir, out, adata=adata, overwrite=args.overwrite, seed=args.seed
        )
    from .bundle import read_manifest

    man = read_manifest(path, check_files=False)
    print(
        f"wrote bundle {path} ({man.model_class}, {man.n_genes} genes, "
        f"n_latent={man.config.get('n_latent')}); validated at atol="
        f"{man.validation.get('atol')}, rtol={man.validation.get('rtol')}"
    )
    return 0


def cmd_latent(args: argparse.Namespace) -> int:
    out = _check_output(args.output, LATENT_SUFFIXES, "output", overwrite=args.overwrite)
    suffix = out.suffix.lower()
    if args.return_dist and suffix == ".npy":
        raise CLIError(
            "--return-dist gives two arrays (mean, variance); write them to an .h5ad or .csv output"
        )
    if suffix == ".h5ad" and (not args.key or "/" in args.key):
        raise CLIError(f"--key must be a non-empty name without '/', got {args.key!r}")
    model = _load_model(args)
    adata = _read_h5ad(args.input, backed=suffix != ".h5ad")
    _note_overlap(model, adata, args)
    try:
        res = model.get_latent_representation(
            adata,
            give_mean=not args.sample,
            mc_samples=args.mc_samples,
            return_dist=args.return_dist,
            **_data_kwargs(args),
        )
        mean, var = res if args.return_dist else (res, None)
        n_latent = mean.shape[1]
        if suffix == ".h5ad":
            adata.obsm[args.key] = mean
            if var is not None:
                adata.obsm[args.key + "_var"] = var

            def write(tmp: Path) -> None:
                adata.write_h5ad(tmp)

        elif suffix == ".npy":
            write = _save_npy(mean)
        else:
            import numpy as np

            cols = [f"latent_{i}" for i in range(n_latent)]
            values = mean
            if var is not None:
                cols += [f"latent_var_{i}" for i in range(n_latent)]
                values = np.concatenate([mean, var], axis=1)
            write = _save_csv(_frame(values, adata.obs_names, cols))
        _write_atomic(out, write, overwrite=args.overwrite)
    finally:
        _close(adata)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    out = _check_output(args.output, PREDICT_SUFFIXES, "output", overwrite=args.overwrite)
    if out.suffix.lower() == ".h5ad" and (not args.key or "/" in args.key):
        raise CLIError(f"--key must be a non-empty name without '/', got {args.key!r}")
    model = _load_model(args)
    if not hasattr(model, "predict"):
        raise CLIError(
            f"{args.bundle} holds a {model.manifest.model_class} model; predict needs a SCANVI "
            "bundle (export a scvi.model.SCANVI)"
        )
    adata = _read_h5ad(args.input, backed=out.suffix.lower() != ".h5ad")
    _note_overlap(model, adata, args)
    try:
        kw = {k: v for k, v in _data_kwargs(args).items() if k != "seed"}
        probs = model.predict(adata, soft=True, **kw)
        labels = probs.columns.to_numpy()[probs.to_numpy().argmax(1)]
        if out.suffix.lower() == ".h5ad":
            adata.obs[args.key] = labels
            if args.soft:
                adata.obsm[f"{args.key}_probabilities"] = probs.set_index(adata.obs_names)

            def write(tmp: Path) -> None:
                adata.write_h5ad(tmp)

        else:
            table = probs.copy() if args.soft else probs.iloc[:, :0].copy()
            table.insert(0, "prediction", labels)
            table.index = adata.obs_names
            write = _save_csv(table)
        _write_atomic(out, write, overwrite=args.overwrite)
    finally:
        _close(adata)
    return 0


_METRICS = {
    "elbo": "elbo",
    "reconstruction-error": "reconstruction_loss",
    "marginal-ll": "marginal_ll",
}


def _metric_values(model, adata, args: argparse.Namespace, per_cell: bool):
    """(mean value, per-cell array or None) of the command's metric."""
    import numpy as np

    kw = _data_kwargs(args)
    command = args.metric_command
    if command == "elbo":
        if not per_cell:
            return model.get_elbo(adata, **kw), None
        cells = model.get_elbo(adata, return_mean=False, **kw)
        return float(cells.mean()), cells
    if command == "reconstruction-error":
        res = model.get_reconstruction_error(adata, return_mean=not per_cell, **kw)
        val = res["reconstruction_loss"]
        return (float(val.mean()), val) if per_cell else (float(val), None)
    # marginal-ll: the model's mean is a mean of per-minibatch means; reproduce it from the
    # per-cell values (minibatches are consecutive runs of batch_size cells) to run once.
    if not per_cell:
        return model.get_marginal_ll(adata, n_mc_samples=args.n_mc_samples, **kw), None
    from .model import DEFAULT_BATCH_SIZE

    cells = model.get_marginal_ll(adata, n_mc_samples=args.n_mc_samples, return_mean=False, **kw)
    bs = args.batch_size or DEFAULT_BATCH_SIZE
    means = [cells[i : i + bs].mean() for i in range(0, len(cells), bs)]
    return float(np.mean(means)), cells


def cmd_metric(args: argparse.Namespace) -> int:
    metric = _METRICS[args.metric_command]
    out = None
    if args.per_cell:
        out = _check_output(
            args.per_cell, PER_CELL_SUFFIXES, "--per-cell", overwrite=args.overwrite
        )
    model = _load_model(args)
    adata = _read_h5ad(args.input, backed=True)
    _note_overlap(model, adata, args)
    try:
        value, cells = _metric_values(model, adata, args, per_cell=out is not None)
        n_cells = int(adata.n_obs)
        if out is not None:
            if out.suffix.lower() == ".npy":
                write = _save_npy(cells)
            else:
                write = _save_csv(_frame(cells, adata.obs_names, [metric]))
            _write_atomic(out, write, overwrite=args.overwrite)
    finally:
        _close(adata)
    if args.json:
        result = {
            "metric": metric,
            "value": float(value),
            "n_cells": n_cells,
            "bundle": str(args.bundle),
            "provider": model.provider,
            "seed": args.seed,
        }
        if args.metric_command == "marginal-ll":
            result["n_mc_samples"] = args.n_mc_samples
        if out is not None:
            result["per_cell"] = str(out)
        _print_json(result)
    else:
        print(f"{metric}: {value:.4f}")
    return 0


def _library_mode(config: dict[str, Any], size_factor_key: str | None) -> str:
    if config.get("use_size_factor_key"):
        return f"size factors from obs[{size_factor_key!r}]"
    if config.get("use_observed_lib_size", True):
        return "observed (log total counts of each cell)"
    return "learned (per-batch log-normal prior)"


def _file_rows(root: Path, files: dict[str, str]) -> list[dict[str, Any]]:
    from .bundle import MANIFEST_FILE, sha256_file

    rows = [{"name": MANIFEST_FILE, "size": (root / MANIFEST_FILE).stat().st_size, "ok": None}]
    for name, digest in files.items():
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not p.is_file():
            rows.append({"name": name, "size": None, "ok": False})
            continue
        rows.append({"name": name, "size": p.stat().st_size, "ok": sha256_file(p) == digest})
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    from . import __version__
    from .bundle import read_manifest

    root = Path(args.bundle)
    man = read_manifest(root, check_files=False)
    c, reg = man.config, man.registry
    versions = dict(man.versions)
    opset = man.graphs.get("opset")
    files = _file_rows(root, man.files)

    def cat(field) -> dict[str, Any]:
        return {"key": field.key, "categories": list(field.categories)}

    info = {
        "bundle": str(root),
        "model_class": man.model_class,
        "module_class": c.get("module_class"),
        "schema_version": man.schema_version,
        "n_genes": man.n_genes,
        "genes": list(man.genes),
        "n_latent": c.get("n_latent"),
        "n_hidden": c.get("n_hidden"),
        "n_layers": c.get("n_layers"),
        "gene_likelihood": c.get("gene_likelihood"),
        "dispersion": c.get("dispersion"),
        "latent_distribution": c.get("latent_distribution"),
        "library_size": _library_mode(c, reg.size_factor_key),
        "layer": reg.layer,
        "batch": cat(reg.batch),
        "labels": cat(reg.labels),
        "categorical_covariates": [cat(f) for f in reg.categorical_covariates],
        "continuous_covariates": list(reg.continuous_covariates),
        "size_factor_key": reg.size_factor_key,
        "versions": {**versions, "opset": opset},
        "runtime_version": __version__,
        "validation": {k: man.validation.get(k) for k in ("atol", "rtol", "seed")},
        "config": c,
        "files": files,
        "checksums_ok": all(f["ok"] is not False for f in files),
    }
    if args.json:
        _print_json(info)
        return 0

    def cats(field) -> str:
        n = field.n_categories
        return f"{n} {'category' if n == 1 else 'categories'}: {_preview(field.categories)}"

    batch = (
        f"obs[{reg.batch.key!r}] ({cats(reg.batch)})"
        if reg.batch.key is not None
        else "none (trained without a batch key)"
    )
    labels = (
        f"obs[{reg.labels.key!r}] ({cats(reg.labels)})"
        if reg.labels.key is not None
        else "none (trained without a labels key)"
    )
    cat_covs = (
        "; ".join(f"obs[{f.key!r}] ({cats(f)})" for f in reg.categorical_covariates) or "none"
    )
    cont_covs = ", ".join(f"obs[{k!r}]" for k in reg.continuous_covariates) or "none"
    ver_names = (
        ("scvi-tools", "scvi_tools"),
        ("torch", "torch"),
        ("onnx", "onnx"),
        ("onnxruntime", "onnxruntime"),
        ("scvi-onnx", "scvi_onnx"),
    )
    ver = ", ".join(f"{label} {versions[k]}" for label, k in ver_names if k in versions)
    arch = f"n_hidden {c.get('n_hidden')}, n_layers {c.get('n_layers')}"
    lines = [
        ("bundle", str(root)),
        ("model", f"{man.model_class} (module {c.get('module_class')}; {arch})"),
        ("schema version", str(man.schema_version)),
        ("genes", f"{man.n_genes} ({_preview(man.genes)})"),
        ("n_latent", str(c.get("n_latent"))),
        ("gene likelihood", str(c.get("gene_likelihood"))),
        ("dispersion", str(c.get("dispersion"))),
        ("latent distribution", str(c.get("latent_distribution"))),
        ("library size", info["library_size"]),
        ("expression from", f"layers[{reg.layer!r}]" if reg.layer else "X"),
        ("batch", batch),
        ("labels", labels),
        ("categorical covariates", cat_covs),
        ("continuous covariates", cont_covs),
        ("size factor key", f"obs[{reg.size_factor_key!r}]" if reg.size_factor_key else "none"),
        ("exported with", f"{ver}; ONNX opset {opset}" if ver else f"ONNX opset {opset}"),
        ("this runtime", f"scvi-onnx {__version__}"),
        (
            "validation",
            f"atol {man.validation.get('atol')}, rtol {man.validation.get('rtol')}",
        ),
    ]
    width = max(len(k) for k, _ in lines) + 1
    for k, v in lines:
        print(f"{k + ':':<{width}} {v}")
    print("files:")
    name_w = max(len(f["name"]) for f in files)
    for f in files:
        size = "missing" if f["size"] is None else _human_size(f["size"])
        check = {None: "", True: "sha256 ok", False: "CHECKSUM MISMATCH"}[f["ok"]]
        if f["size"] is None:
            check = "MISSING"
        print(f"  {f['name']:<{name_w}}  {size:>10}  {check}".rstrip())
    if not info["checksums_ok"]:
        logger.warning("bundle files are missing or altered; the bundle will not load")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    # not ``from . import verify``: once imported, the submodule shadows the function there
    from .selfcheck import verify

    report = verify(args.bundle, device=args.device)
    if args.json:
        _print_json(report.to_json())
        return 0 if report.ok else 1
    header = ("output", "max abs", "max rel", "tolerance", "result")
    rows = [
        (
            r.output,
            f"{r.max_abs_diff:.3g}",
            f"{r.max_rel_diff:.3g}",
            f"atol {r.atol:g} + rtol {r.rtol:g}",
            "PASS" if r.ok else "FAIL",
        )
        for r in report.rows
    ]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    print(f"bundle {report.path} on {report.provider}")
    for row in [header, *rows]:
        print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip())
    n_fail = sum(not r.ok for r in report.rows)
    if report.ok:
        print(f"OK: all {len(report.rows)} outputs within tolerance")
    elif not report.rows:
        print("FAIL: the bundle holds no probe outputs to compare")
    else:
        print(f"FAIL: {n_fail} of {len(report.rows)} outputs out of tolerance")
    return 0 if report.ok else 1


# ============================================================================================
# entry point
# ============================================================================================
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {_one_line(record.getMessage())}"


@contextlib.contextmanager
def _cli_environment(verbose: int) -> Iterator[None]:
    """Logging to stderr and one-line warnings, restored on exit (main is callable in-process)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    level = logging.INFO if verbose else logging.WARNING
    handler.setLevel(level)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(f"{PROG}: warning: {_one_line(message)}\n")

    try:
        with warnings.catch_warnings():
            warnings.showwarning = showwarning
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


_USER_ERRORS: tuple[type[BaseException], ...] = (CLIError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    from .errors import ScviOnnxError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    with _cli_environment(args.verbose):
        try:
            return int(args.func(args))
        except (ScviOnnxError, *_USER_ERRORS) as e:
            if args.debug:
                raise
            sys.stderr.write(f"{PROG}: error: {_error_message(e)}\n")
            return 2
        except KeyboardInterrupt:
            if args.debug:
                raise
            sys.stderr.write(f"{PROG}: error: interrupted\n")
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
