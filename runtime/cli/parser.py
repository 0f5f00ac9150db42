"""The command line's parser: commands, their arguments and help."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from ..arguments import check_positive_int, check_seed, check_tolerance
from ..bundle import format as F
from ..errors import InvalidArgumentError
from ..models.registry import MODELS
from ..sessions import DEVICES
from . import commands, info
from .common import EXPORT_HINT, PROG, one_line
from .distributed import add_scheduler_options


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage stays available with --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {one_line(message)} (see '{self.prog} --help')\n")


#: The input of the commands that read cells.
INPUT_HELP = "input AnnData (.h5ad), or MuData (.h5mu) for models set up with setup_mudata"


def _library_check(check, text: str, parse=int):
    """An argparse type from the library's own check (one implementation of each)."""
    try:
        value = parse(text)
    except ValueError:
        kind = "an integer" if parse is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
    try:
        return check(value)
    except InvalidArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    return _library_check(lambda v: check_positive_int("the value", v), text)


def _seed(text: str) -> int:
    return _library_check(check_seed, text)


def _tolerance(text: str) -> float:
    return _library_check(lambda v: check_tolerance("the tolerance", v), text, float)


def _assignment(text: str) -> tuple[str, str]:
    """``COLUMN=VALUE`` (the value may contain '=')."""
    column, sep, value = text.partition("=")
    if not sep or not column:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE, got {text!r}")
    return column, value


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


def _digest_option(parser: Any) -> None:
    parser.add_argument(
        "--expect-digest",
        metavar="DIGEST",
        default=None,
        help="refuse the bundle unless its digest (sha256:..., shown by `info`) is DIGEST",
    )


BATCH_SIZE_HELP = "cells per minibatch: memory only, results do not depend on it (default: 128)"
#: marginal-ll: the printed value is scvi-tools' reduction, which the batch size changes
MLL_BATCH_SIZE_HELP = (
    "cells per minibatch (default: 128): each cell's value does not depend on it, but the "
    "printed value is scvi-tools' mean of per-minibatch means, which does where the last "
    "minibatch is smaller (--per-cell gives each cell's)"
)


def _data_options(parser: argparse.ArgumentParser, batch_size_help: str = BATCH_SIZE_HELP) -> None:
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
        help=batch_size_help,
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
    _digest_option(g)
    g.add_argument(
        "--layer",
        metavar="NAME",
        help="read the counts from adata.layers[NAME] (default: where the model was trained to "
        "read them: X or its registered layer)",
    )
    g.add_argument(
        "--var-column",
        dest="gene_key",
        metavar="COLUMN",
        help="match genes by adata.var[COLUMN] (e.g. feature_name for symbols, gene_ids for "
        "Ensembl IDs) instead of var_names",
    )
    g.add_argument(
        "--obs",
        action="append",
        default=[],
        type=_assignment,
        metavar="COLUMN=VALUE",
        help="set obs column COLUMN to VALUE for every cell (a file that is one sample: "
        "--obs batch=pbmc_10k); repeatable",
    )
    g.add_argument(
        "--unseen-as",
        action="append",
        default=[],
        type=_assignment,
        metavar="COLUMN=CATEGORY",
        help="compute cells whose COLUMN category the model never saw as training category "
        "CATEGORY (an explicit approximation, recorded in the output); repeatable. The latent "
        "space of a model whose encoder does not take COLUMN needs none",
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
    from .. import __version__

    parser = _Parser(
        prog=PROG,
        description=(
            f"Run trained scvi-tools models ({', '.join(MODELS)}) without torch: export a model "
            "to an ONNX bundle, then embed and score cells with onnxruntime + numpy."
        ),
        epilog=(
            "examples:\n"
            "  scvi-onnx export my_scvi_model/ my_bundle/        (needs "
            f"{EXPORT_HINT})\n"
            "  scvi-onnx info my_bundle/\n"
            "  scvi-onnx verify my_bundle/\n"
            "  scvi-onnx latent my_bundle/ query.h5ad -o query_latent.h5ad\n"
            "  scvi-onnx elbo my_bundle/ query.h5ad --json\n"
            "  scvi-onnx serve my_bundle/ --port 8000            (needs "
            "pip install 'scvi-onnx[serve]')\n"
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
            f"Export a saved scvi-tools model ({', '.join(MODELS)}: the folder written by "
            "model.save(), holding model.pt, or a model hub folder with its model card) to a "
            "scvi-onnx bundle folder. The graphs are validated against the "
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
    for name, default in (("atol", F.DEFAULT_ATOL), ("rtol", F.DEFAULT_RTOL)):
        p.add_argument(
            f"--{name}",
            type=_tolerance,
            default=default,
            metavar="X",
            help=(
                f"validation tolerance, |onnx - torch| <= atol + rtol * |torch| (default "
                f"{default:g}); an output past it only by float32 rounding (a model with "
                "large activations) is accepted with a wider one for it alone"
            ),
        )
    p.add_argument(
        "--reproduce",
        choices=("trained", "installed"),
        default="trained",
        help=(
            "for a model trained by an older scvi-tools: reproduce what the version that "
            "trained it computes (default), or what the installed scvi-tools computes on the "
            "same weights. They differ for TOTALVI trained before 1.3.1 (see the README)"
        ),
    )
    p.set_defaults(func=commands.cmd_export)

    # ------------------------------------------------------------------ latent
    p = sub.add_parser(
        "latent",
        parents=[common],
        help="latent representation of cells (to .h5ad, .npy or .csv)",
        description=(
            "Compute the latent representation of the cells of IN.h5ad (genes are matched by "
            "name), as SCVI.get_latent_representation. The format of OUT follows its "
            "extension: .h5ad (.h5mu for a MuData input) = a copy of the input with the latent in "
            "obsm[KEY]; .npy = the "
            "(cells x latent) array; .csv = a table indexed by obs_names with columns "
            "latent_0 .. latent_{L-1}."
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder")
    p.add_argument("input", metavar="IN.h5ad", help=INPUT_HELP)
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
    p.set_defaults(func=commands.cmd_latent)
    add_scheduler_options(p)

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
    p.add_argument("input", metavar="IN.h5ad", help=INPUT_HELP)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output: .csv or .h5ad")
    p.add_argument("--soft", action="store_true", help="also write the label probabilities")
    p.add_argument(
        "--key",
        default="scanvi_prediction",
        help="obs key of the labels in an .h5ad output (default: scanvi_prediction)",
    )
    _data_options(p)
    p.set_defaults(func=commands.cmd_predict)
    add_scheduler_options(p)

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
            "value is scvi-tools' reduction: the mean over minibatches of per-minibatch means "
            "(it moves with --batch-size where the last minibatch is smaller; the mean of the "
            "--per-cell values does not).",
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
        p.add_argument("input", metavar="IN.h5ad", help=INPUT_HELP)
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
        _data_options(p, MLL_BATCH_SIZE_HELP if name == "marginal-ll" else BATCH_SIZE_HELP)
        p.set_defaults(func=commands.cmd_metric, metric_command=name)
        add_scheduler_options(p)

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
    p.set_defaults(func=info.cmd_info)

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
    _digest_option(p)
    p.add_argument("--json", action="store_true", help="print the report as a JSON object")
    p.set_defaults(func=commands.cmd_verify)

    # ------------------------------------------------------------------ serve
    from ..serve.cli import add_serve_parser

    add_serve_parser(sub, [common])
    return parser
