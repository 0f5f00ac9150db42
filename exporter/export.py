"""Export a trained scvi-tools model to a scvi-onnx bundle: the orchestration.

load (a model or a saved folder, any scvi-tools version the legacy loader reaches) -> the
model class's :class:`~scvi_onnx.exporter.specs.base.ExportSpec` (from the runtime's registry)
-> refusals, config, arrays, graphs with probes and torch references -> trace -> validate in
ONNX Runtime against torch -> write arrays, probes, manifest with checksums -> rename the folder
into place. Nothing is written at ``path`` unless everything passed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scvi_onnx.arguments import check_tolerance
from scvi_onnx.bundle import Manifest, read_config, sha256_file
from scvi_onnx.bundle import format as F
from scvi_onnx.errors import ExportValidationError, InvalidArgumentError, UnsupportedModelError
from scvi_onnx.models.registry import MODELS, entry
from scvi_onnx.selfcheck import VerifyRow, deviation, product_deviation

from .precision import float32_spread, within_rounding
from .provenance import folder_provenance, model_provenance
from .specs.base import REPRODUCE, ExportSpec
from .trace import trace

logger = logging.getLogger(__name__)


def supported_models() -> dict[str, str]:
    """Model classes the exporter handles, with their scvi-tools module classes."""
    return {name: e.load("export_spec").module_class for name, e in MODELS.items()}


def spec_for(model: Any, reproduce: str = "trained") -> ExportSpec:
    """The export spec of ``model``'s class (an :class:`UnsupportedModelError` for others)."""
    cls = type(model).__name__
    if cls not in MODELS:
        raise UnsupportedModelError(
            f"cannot export a {cls}: supported model classes are {sorted(MODELS)}"
        )
    return entry(cls).load("export_spec")(model, reproduce)


def _load_model(model: Any, adata: Any = None):
    """A model instance, or a saved scvi-tools model folder of any scvi-tools version >= 0.8."""
    if isinstance(model, (str, os.PathLike)):
        from .legacy import load_saved_model

        # model.pt / attr.pkl are pickles: export only trusted folders (see README).
        return load_saved_model(model, adata, supported=tuple(MODELS))
    return model


def export_model(
    model: Any,
    path: str | os.PathLike,
    *,
    adata: Any = None,
    overwrite: bool = False,
    atol: float = F.DEFAULT_ATOL,
    rtol: float = F.DEFAULT_RTOL,
    seed: int = 0,
    reproduce: str = "trained",
) -> Path:
    """Export a trained scvi-tools model to a scvi-onnx bundle folder.

    Parameters
    ----------
    model
        A trained scvi-tools model (see :func:`supported_models`), or the path of a folder
        written by ``model.save()`` or laid out as a scvi-tools model hub folder (``model.pt``,
        optional ``adata.h5ad``, ``_scvi_required_metadata.json``, model card ``README.md``):
        its metadata and model card are kept in the bundle (``model.pt`` is a pickle: export
        only folders you trust).
    path
        Bundle folder to write. Written to a temporary folder first, then renamed.
    adata
        AnnData to load a saved folder with (optional; the saved registry is enough).
    overwrite
        Replace an existing bundle folder at ``path``.
    atol, rtol
        Validation tolerance of the ONNX graphs against the torch modules on probe cells:
        every output must satisfy ``|onnx - torch| <= atol + rtol * |torch|``, or, for a
        model with large activations, be within 4x its float32 rounding spread (the traced
        graph in float32 against float64; :mod:`scvi_onnx.exporter.precision`), which widens
        that output's tolerance (at most 1e-2), with a warning and a record in the manifest.
    seed
        Seed of the probe cells and noise (the export is deterministic for a given seed).
    reproduce
        For a model trained by an older scvi-tools: ``"trained"`` (default) reproduces what
        the version that trained it computes, ``"installed"`` what the installed scvi-tools
        computes on the same weights. They differ for TOTALVI models trained before 1.3.1,
        whose encoder read ``log(1 + counts)``: 1.3.1 divides the counts by ``1 + their
        mean`` first and applies that to older models too (README, "Differences").

    Returns
    -------
    The bundle path.

    Raises
    ------
    UnsupportedModelError
        The model uses an option the exporter cannot reproduce.
    ExportValidationError
        The exported graphs do not reproduce the torch modules within tolerance.
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    out = Path(path)
    check_output(out, overwrite, Path(model) if isinstance(model, (str, os.PathLike)) else None)
    if reproduce not in REPRODUCE:
        raise InvalidArgumentError(f"reproduce={reproduce!r}: choose one of {REPRODUCE}")
    atol, rtol = check_tolerance("atol", atol), check_tolerance("rtol", rtol)
    # Nothing here may advance the user's torch RNG (building nn.Linear modules would).
    with torch.random.fork_rng(devices=[]):
        return _export(
            model, out, adata=adata, atol=atol, rtol=rtol, seed=seed, reproduce=reproduce
        )


def check_output(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse, before any work, an output path that exists (without ``overwrite``) or whose
    replacement would delete what is not a bundle: a file, a folder holding other things
    than a bundle, the model folder being exported or a folder holding it, the current folder
    or one above it. ``overwrite`` replaces an existing bundle (or an empty folder) only."""
    from scvi_onnx.cli.io import replacement_refusal

    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (or --overwrite) to replace it")
    why = replacement_refusal(
        out,
        lambda p: (p / F.MANIFEST_FILE).is_file(),
        f"a bundle (no {F.MANIFEST_FILE})",
        source,
        "the model folder being exported",
    )
    if why is not None:
        raise InvalidArgumentError(
            f"{out} exists and {why}: overwrite replaces only a bundle folder or an empty one, "
            "and would delete it: remove it yourself or write the bundle to another path"
        )


def _export(model, out: Path, *, adata, atol, rtol, seed, reproduce) -> Path:
    folder = Path(model) if isinstance(model, (str, os.PathLike)) else None
    model = _load_model(model, adata)
    spec = spec_for(model, reproduce)
    spec.check()
    if not getattr(model, "is_trained_", True):
        warnings.warn("exporting a model that was never trained", UserWarning, stacklevel=3)
    registry = spec.registry()
    genes = spec.genes()
    config = spec.config(registry)
    if len(genes) != config["n_input"]:
        raise UnsupportedModelError(f"{len(genes)} gene names for {config['n_input']} inputs")
    arrays = spec.arrays(genes)
    version = model_provenance(model).get("trained_with", "").removeprefix("scvi-tools ") or None
    provenance = folder_provenance(folder, version) if folder else model_provenance(model)
    extra = {**spec.extra(genes), "provenance": provenance}
    graphs, probe_arrays = spec.graphs(registry, config, arrays, np.random.default_rng(seed))
    manifest = Manifest(
        schema_version=F.SCHEMA_VERSION,
        model_class=spec.model_class,
        config=config,
        genes=tuple(genes),
        registry=registry,
        graphs={},
    )
    # the runtime must read this config: the same check as at load
    read_config(manifest, entry(spec.model_class).load("module").Config)

    # the folders created for the bundle are removed again if the export fails
    made: list[Path] = []  # innermost first, as mkdir(parents=True) makes them ("new/../b")
    for p in (out.parent, *out.parent.parents):
        q = Path(os.path.abspath(p))
        if not q.exists() and q not in made:
            made.append(q)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for g in graphs:
            trace(g.module, g.io, g.feeds, tmp / g.file)
        layers = _input_layers(tmp, graphs)
        reports, widened = _validate(spec, tmp, config, arrays, graphs, probe_arrays, atol, rtol)
        reports += [r for _, r in layers.values()]
        np.savez(tmp / F.ARRAYS_FILE, **arrays)
        probes: dict[str, np.ndarray] = {}
        for g in graphs:
            probes |= g.probes()
        np.savez_compressed(tmp / F.PROBES_FILE, **(probes | probe_arrays))
        _write_manifest(
            tmp,
            manifest,
            graphs,
            arrays,
            extra,
            reports,
            widened,
            atol,
            rtol,
            seed,
            {name: entry for name, (entry, _) in layers.items()},
        )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is a normal folder
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # only if still empty
            try:
                p.rmdir()
            except OSError:
                continue
        raise
    logger.info("wrote bundle %s", out)
    return out


def _input_layers(folder: Path, graphs) -> dict[str, tuple[dict, dict]]:
    """Each sparse graph's manifest ``input_layer`` entry and a validation report.

    The first layer's weight is found among the full graph's initializers (by value: the
    name is torch's), read back as the runtime reads it (from its offset in the file), and
    its product over the probe cells' non-zero entries checked against the exact (float64)
    one (:func:`~scvi_onnx.selfcheck.product_deviation`)."""
    import onnx
    from onnx import numpy_helper

    from scvi_onnx.data import Entries
    from scvi_onnx.sessions.input_layer import InputLayer

    out = {}
    by_name = {g.name: g for g in graphs}
    for g in graphs:
        if g.input_layer is None:
            continue
        full_name, w, rows, more = g.input_layer
        full = by_name[full_name]
        want = w.detach().cpu().numpy()
        model = onnx.load(str(folder / full.file))
        name = None
        for init in model.graph.initializer:
            if len(init.dims) == 2 and init.dims[0] >= rows and init.dims[1] == want.shape[1]:
                if np.array_equal(numpy_helper.to_array(init)[:rows], want, equal_nan=True):
                    name = init.name
                    break
        if name is None:
            raise ExportValidationError(
                f"{full.file} holds no initializer equal to the first layer's weight "
                f"{tuple(want.shape)} that {g.file} leaves out: please report this"
            )
        layer = InputLayer(folder / full.file, name, rows)
        if not np.array_equal(layer.weight, want, equal_nan=True):
            raise ExportValidationError(
                f"{full.file}: initializer {name!r} reads back other values than were traced; "
                "please report this"
            )
        x = np.ascontiguousarray(full.feeds[F.IN_X], dtype=np.float32)
        got = layer.product(Entries.from_dense(x))
        exact = x.astype(np.float64) @ want.astype(np.float64)
        magnitude = np.abs(x).astype(np.float64) @ np.abs(want).astype(np.float64)
        row = product_deviation(f"{g.name}.{F.IN_X_PRODUCT}", got, exact, magnitude)
        if not row.ok:
            raise ExportValidationError(
                f"the sparse product of {g.name} does not match the dense one: "
                f"{json.dumps(asdict(row))}; please report this"
            )
        entry = {"graph": full_name, "initializer": name, "rows": int(rows), **more}
        out[g.name] = (entry, asdict(row))
    return out


def _validate(
    spec, folder, config, arrays, graphs, probe_arrays, atol, rtol
) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Every graph in ONNX Runtime against scvi-tools' torch modules, and the spec's own
    checks; an :class:`ExportValidationError` listing every failure. Also returns the outputs
    accepted within their float32 rounding spread, with the tolerance each passed with
    (:mod:`.precision`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    reports = []
    widened: dict[str, dict[str, float]] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    spreads: dict[str, dict] = {}  # each graph's float32 rounding spread, run on first need
    by_name = {g.name: g for g in graphs}

    def spread(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if name not in spreads:  # {} when the graph cannot run in float64
            spreads[name] = (float32_spread(by_name[name]) if name in by_name else None) or {}
        return spreads[name]

    def add(row: VerifyRow) -> None:
        if row.ok and (row.atol > atol or row.rtol > rtol):
            widened[row.output] = {"atol": row.atol, "rtol": row.rtol}
        reports.append(asdict(row))

    for g in graphs:
        sess = ort.InferenceSession(str(folder / g.file), so, providers=["CPUExecutionProvider"])
        got = dict(zip(g.io.outputs, sess.run(None, g.feeds), strict=True))
        outputs[g.name] = got
        for k in g.io.outputs:
            if k not in g.reference:
                continue
            row = deviation(f"{g.name}.{k}", got[k], g.reference[k], atol, rtol)
            if not row.ok:
                row = within_rounding(row, got[k], g.reference[k], spread(g.name).get(k))
            add(row)
    # the spec's derived checks: a failed one gets the same second chance from the spread of
    # the graph output it derives from (the spec computes the derived spread: spread(name))
    for row in spec.checks(config, arrays, graphs, outputs, probe_arrays, atol, rtol, spread):
        add(row)
    failed = [r for r in reports if not r["ok"]]
    if failed:
        raise ExportValidationError(
            "exported graphs do not reproduce the torch modules: "
            + "; ".join(json.dumps(r) for r in failed)
            + ". An output past the tolerance is accepted when it is within its float32 "
            "rounding spread (the traced graph in float32 against float64); these are not, so "
            "they are most likely a defect: please report them. To accept them anyway, give "
            "a wider tolerance: export_model(..., rtol=1e-3) / scvi-onnx export --rtol 1e-3"
        )
    odd = [r for r in reports if r.get("reason") and r["output"] not in widened]
    if odd:
        warnings.warn(
            "the model gives non-finite values on some probe cells, as scvi-tools' torch modules "
            "do on the same cells (the graphs reproduce them): "
            + "; ".join(f"{r['output']}: {r['reason']}" for r in odd)
            + ". Cells like them will get non-finite values from scvi-tools and scvi-onnx alike.",
            UserWarning,
            stacklevel=4,
        )
    if widened:
        warnings.warn(
            "accepted within float32 rounding: "
            + "; ".join(f"{r['output']}: {r['reason']}" for r in reports if r["output"] in widened)
            + ". The model has large activations: the traced graph's own float32 result is "
            "that far from its float64 one on the probe cells, and torch's float32 is too. The "
            "manifest records the tolerance for these outputs; verify applies it.",
            UserWarning,
            stacklevel=4,
        )
    for r in reports:
        logger.info(
            "validated %s: max abs %.3g, max rel %.3g",
            r["output"],
            r.get("max_abs_diff"),
            r.get("max_rel_diff"),
        )
    return reports, widened


def _write_manifest(
    folder, manifest, graphs, arrays, extra, reports, widened, atol, rtol, seed, layers
) -> None:
    import onnx
    import onnxruntime as ort
    import scvi

    from scvi_onnx import __version__

    graph_entries: dict[str, Any] = {
        g.name: {
            "file": g.file,
            "inputs": list(g.io.inputs),
            "outputs": list(g.io.outputs),
            **({F.INPUT_LAYER: layers[g.name]} if g.name in layers else {}),
        }
        for g in graphs
    }
    files = (*(g.file for g in graphs), F.ARRAYS_FILE, F.PROBES_FILE)
    full = Manifest(
        schema_version=manifest.schema_version,
        model_class=manifest.model_class,
        config=manifest.config,
        genes=manifest.genes,
        registry=manifest.registry,
        graphs={
            **graph_entries,
            "arrays": {"file": F.ARRAYS_FILE, "names": sorted(arrays)},
            "probes": {"file": F.PROBES_FILE},
            "opset": F.OPSET,
        },
        versions={
            "scvi_onnx": __version__,
            "scvi_tools": scvi.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
        validation={
            "atol": atol,
            "rtol": rtol,
            "seed": seed,
            "reports": reports,
            # outputs accepted within their float32 rounding spread, and their tolerance
            **({F.VALIDATION_WIDENED: widened} if widened else {}),
        },
        files={name: sha256_file(folder / name) for name in files},
        extra=extra,
    )
    (folder / F.MANIFEST_FILE).write_text(json.dumps(full.to_json(), indent=1) + "\n")
