"""The commands that run a bundle: export, latent, predict, the metrics, verify."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from .common import EXPORT_HINT, PROG, CLIError, one_line, preview, print_json, widened_text
from .io import check_output, close, frame, read_h5ad, save_csv, save_npy, write_atomic

LATENT_SUFFIXES = (".h5ad", ".npy", ".csv", ".h5mu")
PREDICT_SUFFIXES = (".csv", ".h5ad")
PER_CELL_SUFFIXES = (".csv", ".npy")


def _load_model(args: argparse.Namespace):
    from .. import load

    return load(args.bundle, device=args.device, seed=args.seed, expected_digest=args.expect_digest)


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
        "layer": args.layer,
        "gene_key": args.gene_key,
        "unseen_as": dict(args.unseen_as) or None,
        "progress_bar": _progress(args),
    }


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that shaped the numbers, for outputs and JSON (provenance)."""
    out: dict[str, Any] = {"seed": args.seed}
    for key in ("layer", "gene_key", "missing_genes"):
        value = getattr(args, key, None)
        if value not in (None, "error"):
            out[key] = value
    if args.unseen_as:
        out["unseen_as"] = dict(args.unseen_as)
    if args.obs:
        out["obs"] = dict(args.obs)
    return out


def _set_obs(model, adata, assignments: list[tuple[str, str]]) -> None:
    """``--obs COLUMN=VALUE``: the column set to VALUE for every cell (numeric for continuous
    covariates and size factors)."""
    if not assignments:
        return
    from ..data.mudata import is_mudata, obs_modality

    reg = model.manifest.registry
    numeric = set(reg.continuous_covariates) | {reg.size_factor_key}
    registered = {k for k, _ in reg.obs_columns()}
    for column, value in assignments:
        if column not in registered:
            raise CLIError(
                f"--obs {column}={value}: the model registered no obs column {column!r}; its "
                f"obs columns: {', '.join(sorted(registered)) or 'none'}"
            )
        if column in numeric:
            try:
                v: Any = float(value)
            except ValueError:
                raise CLIError(
                    f"--obs {column}={value}: {column!r} is numeric in the model; pass a number"
                ) from None
        else:
            v = value
        if not is_mudata(adata):
            adata.obs[column] = v
            continue
        # a MuData: where setup_mudata registered the column (a modality's obs or its own)
        for key, what in reg.obs_columns():
            mod = obs_modality(reg, what)
            if key != column or (mod is not None and mod not in adata.mod):
                continue  # a missing modality: from_mudata's error names it
            (adata.obs if mod is None else adata.mod[mod].obs)[column] = v


def _check_not_input(out: Path, args: argparse.Namespace) -> None:
    inp = Path(args.input)
    if inp.exists() and out.resolve() == inp.resolve():
        raise CLIError(
            f"output {out} is the input file; write the results to another file (the input is "
            "read while the output is written)"
        )


def _summary(args: argparse.Namespace, what: str, n_cells: int, started: float) -> None:
    """The one line a successful command ends with (stderr: stdout carries results only)."""
    line = f"{PROG}: {what} of {n_cells} cells in {time.perf_counter() - started:.1f} s"
    notes = getattr(args, "notes", [])
    if notes:
        line += "; note: " + "; ".join(notes)
    sys.stderr.write(line + "\n")


def _provenance(model, args: argparse.Namespace, command: str) -> dict[str, Any]:
    """What an .h5ad output records in ``uns["scvi_onnx"]``."""
    from .. import __version__

    return {
        "command": command,
        "bundle": str(args.bundle),
        "model_class": model.manifest.model_class,
        "scvi_onnx": __version__,
        "provider": model.provider,
        **_options(args),
        **({"notes": list(args.notes)} if getattr(args, "notes", None) else {}),
    }


def _note_overlap(model, adata, args: argparse.Namespace) -> None:
    """Report zero-filled genes and proteins (the data layer refuses genes below
    --min-gene-overlap; a model's proteins are filled by name too, for TOTALVI)."""
    if args.missing_genes != "zero":
        return
    from ..data.mudata import split_input
    from ..data.proteins import obsm_proteins
    from ..errors import ScviOnnxError

    reg = model.manifest.registry
    try:
        inp = split_input(adata, reg)
    except ScviOnnxError:
        return  # the command's own call raises it, with its message
    ov = model.gene_overlap(inp.adata)
    if ov["fraction"] >= args.min_gene_overlap and ov["n_found"] < ov["n_model_genes"]:
        sys.stderr.write(
            f"{PROG}: note: {ov['n_found']} of {ov['n_model_genes']} model genes found "
            f"({100 * ov['fraction']:.1f}%); {len(ov['missing'])} filled with zeros\n"
        )
    field = reg.proteins
    if field is None or not field.named:
        return
    prot = inp.proteins
    if prot is None and field.attr_name == "obsm" and field.attr_key in inp.adata.obsm:
        prot = obsm_proteins(inp.adata, field)
    names = None if prot is None else prot.names
    if names is None or isinstance(names, str | bytes):
        return
    present = set(map(str, names))
    missing = [p for p in field.names if p not in present]
    if missing and len(missing) < field.n_proteins:
        sys.stderr.write(
            f"{PROG}: note: {field.n_proteins - len(missing)} of {field.n_proteins} model "
            f"proteins found; {len(missing)} filled with zeros ({preview(missing, 5)}), "
            "scored as measured zeros\n"
        )


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.bundle)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    try:
        from ..exporter import export_model
    except ImportError as e:
        msg = one_line(e)
        if EXPORT_HINT not in msg:
            msg = f"export needs torch, scvi-tools and onnx ({msg}): {EXPORT_HINT}"
        raise CLIError(msg) from e
    adata = read_h5ad(args.adata, backed=False) if args.adata else None
    # scvi-tools and lightning print to stdout while loading; stdout is for results
    with contextlib.redirect_stdout(sys.stderr):
        path = export_model(
            args.model_dir,
            out,
            adata=adata,
            overwrite=args.overwrite,
            seed=args.seed,
            reproduce=args.reproduce,
            atol=args.atol,
            rtol=args.rtol,
        )
    from ..bundle import read_manifest
    from ..models.registry import feature_name

    man = read_manifest(path, check_files=False)
    print(
        f"wrote bundle {path} ({man.model_class}, {man.n_genes} "
        f"{feature_name(man.model_class)}, "
        f"n_latent={man.config.get('n_latent')}); validated at atol="
        f"{man.validation.get('atol')}, rtol={man.validation.get('rtol')}"
        + widened_text(man.validation)
    )
    return 0


def cmd_latent(args: argparse.Namespace) -> int:
    _check_not_input(Path(args.output), args)
    out = check_output(args.output, LATENT_SUFFIXES, "output", overwrite=args.overwrite)
    suffix = out.suffix.lower()
    if args.return_dist and suffix == ".npy":
        raise CLIError(
            "--return-dist gives two arrays (mean, variance); write them to an .h5ad or .csv output"
        )
    if suffix in (".h5ad", ".h5mu") and (not args.key or "/" in args.key):
        raise CLIError(f"--key must be a non-empty name without '/', got {args.key!r}")
    started = time.perf_counter()
    model = _load_model(args)
    adata = read_h5ad(args.input, backed=suffix not in (".h5ad", ".h5mu"))
    # a MuData (models set up with setup_mudata) is written back as one, an AnnData as one
    mudata_in = type(adata).__name__ == "MuData"
    if suffix in (".h5ad", ".h5mu") and mudata_in != (suffix == ".h5mu"):
        close(adata)
        raise CLIError(
            f"{args.input} is {'a MuData' if mudata_in else 'an AnnData'}: write its latent "
            f"to {'.h5mu' if mudata_in else '.h5ad'}, .npy or .csv"
        )
    try:
        _set_obs(model, adata, args.obs)
        _note_overlap(model, adata, args)
        res = model.get_latent_representation(
            adata,
            give_mean=not args.sample,
            mc_samples=args.mc_samples,
            return_dist=args.return_dist,
            **_data_kwargs(args),
        )
        mean, var = res if args.return_dist else (res, None)
        n_latent = mean.shape[1]
        if suffix in (".h5ad", ".h5mu"):
            adata.obsm[args.key] = mean
            if var is not None:
                adata.obsm[args.key + "_var"] = var
            adata.uns["scvi_onnx"] = _provenance(model, args, "latent")

            def write(tmp: Path) -> None:
                (adata.write if mudata_in else adata.write_h5ad)(tmp)

        elif suffix == ".npy":
            write = save_npy(mean)
        else:
            import numpy as np

            cols = [f"latent_{i}" for i in range(n_latent)]
            values = mean
            if var is not None:
                cols += [f"latent_var_{i}" for i in range(n_latent)]
                values = np.concatenate([mean, var], axis=1)
            write = save_csv(frame(values, adata.obs_names, cols))
        write_atomic(out, write, overwrite=args.overwrite)
        n_cells = int(adata.n_obs)
    finally:
        close(adata)
    _summary(args, f"wrote {out}: the latent space ({n_latent} dimensions)", n_cells, started)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    _check_not_input(Path(args.output), args)
    out = check_output(args.output, PREDICT_SUFFIXES, "output", overwrite=args.overwrite)
    if out.suffix.lower() == ".h5ad" and (not args.key or "/" in args.key):
        raise CLIError(f"--key must be a non-empty name without '/', got {args.key!r}")
    started = time.perf_counter()
    model = _load_model(args)
    if not hasattr(model, "predict"):
        raise CLIError(
            f"{args.bundle} holds a {model.manifest.model_class} model; predict needs a SCANVI "
            "bundle (export a scvi.model.SCANVI)"
        )
    adata = read_h5ad(args.input, backed=out.suffix.lower() != ".h5ad")
    try:
        _set_obs(model, adata, args.obs)
        _note_overlap(model, adata, args)
        kw = {k: v for k, v in _data_kwargs(args).items() if k != "seed"}
        probs = model.predict(adata, soft=True, **kw)
        labels = probs.columns.to_numpy()[probs.to_numpy().argmax(1)]
        if out.suffix.lower() == ".h5ad":
            adata.obs[args.key] = labels
            if args.soft:
                adata.obsm[f"{args.key}_probabilities"] = probs.set_index(adata.obs_names)
            adata.uns["scvi_onnx"] = _provenance(model, args, "predict")

            def write(tmp: Path) -> None:
                adata.write_h5ad(tmp)

        else:
            table = probs.copy() if args.soft else probs.iloc[:, :0].copy()
            table.insert(0, "prediction", labels)
            table.index = adata.obs_names
            write = save_csv(table)
        write_atomic(out, write, overwrite=args.overwrite)
        n_cells = int(adata.n_obs)
    finally:
        close(adata)
    _summary(args, f"wrote {out}: predicted labels", n_cells, started)
    return 0


_METRICS = {
    "elbo": "elbo",
    "reconstruction-error": "reconstruction_loss",
    "marginal-ll": "marginal_ll",
}


def _metric_values(model, adata, args: argparse.Namespace, per_cell: bool):
    """(mean value, per-cell array or None) of the command's metric; a reconstruction error
    with several keys (TOTALVI: genes and proteins) gives ``{key: ...}`` dicts of both."""
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
        means = {k: float(np.mean(v)) for k, v in res.items()}
        cells = res if per_cell else None
        if list(res) != ["reconstruction_loss"]:
            return means, cells
        key = "reconstruction_loss"
        return means[key], (None if cells is None else cells[key])
    # marginal-ll: the model's mean is a mean of per-minibatch means; reproduce it from the
    # per-cell values (minibatches are consecutive runs of batch_size cells) to run once.
    if not per_cell:
        return model.get_marginal_ll(adata, n_mc_samples=args.n_mc_samples, **kw), None
    from ..methods.engine import DEFAULT_BATCH_SIZE

    cells = model.get_marginal_ll(adata, n_mc_samples=args.n_mc_samples, return_mean=False, **kw)
    bs = args.batch_size or DEFAULT_BATCH_SIZE
    means = [cells[i : i + bs].mean() for i in range(0, len(cells), bs)]
    return float(np.mean(means)), cells


def cmd_metric(args: argparse.Namespace) -> int:
    metric = _METRICS[args.metric_command]
    out = None
    if args.per_cell:
        _check_not_input(Path(args.per_cell), args)
        out = check_output(args.per_cell, PER_CELL_SUFFIXES, "--per-cell", overwrite=args.overwrite)
    started = time.perf_counter()
    model = _load_model(args)
    adata = read_h5ad(args.input, backed=True)
    try:
        _set_obs(model, adata, args.obs)
        _note_overlap(model, adata, args)
        value, cells = _metric_values(model, adata, args, per_cell=out is not None)
        n_cells = int(adata.n_obs)
        # several reconstruction terms: one column each, and their sum as the value
        values = value if isinstance(value, dict) else None
        if values is not None:
            value = sum(values.values())
        if out is not None:
            import numpy as np

            columns = list(cells) if isinstance(cells, dict) else [metric]
            table = np.stack(list(cells.values()), 1) if isinstance(cells, dict) else cells
            if out.suffix.lower() == ".npy":
                write = save_npy(table)
            else:
                write = save_csv(frame(table, adata.obs_names, columns))
            write_atomic(out, write, overwrite=args.overwrite)
    finally:
        close(adata)
    if args.json:
        result = {
            "metric": metric,
            "value": float(value),
            **({"values": values} if values is not None else {}),
            "n_cells": n_cells,
            "bundle": str(args.bundle),
            "provider": model.provider,
            **_options(args),
        }
        if args.metric_command == "marginal-ll":
            result["n_mc_samples"] = args.n_mc_samples
            result["reduction"] = "mean of per-minibatch means"
        if out is not None:
            result["per_cell"] = str(out)
        if args.notes:
            result["notes"] = list(args.notes)
        print_json(result)
    else:
        for key, v in (values or {}).items():
            print(f"{key}: {v:.4f}")
        print(f"{metric}: {value:.4f}")
    mean = "mean of per-minibatch means" if args.metric_command == "marginal-ll" else "mean"
    what = f"{metric} ({mean} {value:.4f})" + (f", per cell in {out}" if out is not None else "")
    _summary(args, what, n_cells, started)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    # not ``from . import verify``: once imported, the submodule shadows the function there
    from ..selfcheck import verify

    if args.expect_digest:
        from ..bundle import read_manifest

        read_manifest(args.bundle, check_files=False, expected_digest=args.expect_digest)
    report = verify(args.bundle, device=args.device)
    if args.json:
        print_json(report.to_json())
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
