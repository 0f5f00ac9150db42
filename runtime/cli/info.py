"""``scvi-onnx info``: what a bundle holds and what its input needs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .common import human_size, one_line, preview, print_json, widened_text

logger = logging.getLogger("scvi_onnx.cli")


def _proteins(reg, c: dict[str, Any]) -> dict[str, Any]:
    """A model's registered proteins (TOTALVI): names, and where an input holds them."""
    p = reg.proteins
    if p.attr_name == "obsm":
        where = f"obsm[{p.attr_key!r}]"
    else:
        mod = (reg.modalities or {}).get("proteins")
        where = f"mdata.mod[{mod!r}]" + (f".layers[{p.attr_key!r}]" if p.attr_key else ".X")
    return {
        "n_proteins": p.n_proteins,
        "names": list(p.names),
        "matched_by": "name" if p.named else "position",
        "from": where,
        "missing_in_some_panels": bool(c.get("protein_batch_mask", False)),
    }


def _file_rows(root: Path, files: dict[str, str]) -> list[dict[str, Any]]:
    from ..bundle import MANIFEST_FILE, sha256_file

    rows = [{"name": MANIFEST_FILE, "size": (root / MANIFEST_FILE).stat().st_size, "ok": None}]
    for name, digest in files.items():
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not p.is_file():
            rows.append({"name": name, "size": None, "ok": False})
            continue
        rows.append({"name": name, "size": p.stat().st_size, "ok": sha256_file(p) == digest})
    return rows


def _obs_inputs(man) -> dict[str, Any] | None:
    """Which registered obs columns the encoder takes, which only the scoring methods read,
    and which nothing reads (None where the config cannot be read)."""
    from ..bundle import read_config
    from ..errors import ScviOnnxError
    from ..models.registry import entry

    try:
        module = entry(man.model_class).load("module")
        config = read_config(man, module.Config)
    except ScviOnnxError:
        return None
    inputs = {
        name: tuple(g.get("inputs", ())) for name, g in man.graphs.items() if isinstance(g, dict)
    }
    latent = module.obs_usage(config, inputs, scoring=False)
    scoring = module.obs_usage(config, inputs, scoring=True)
    reg = man.registry
    columns = {
        "batch": [reg.batch.key],
        "labels": [reg.labels.key],
        "cat_covs": [f.key for f in reg.categorical_covariates],
        "cont_covs": list(reg.continuous_covariates),
        "size_factor": [reg.size_factor_key],
        "panel": [reg.panel.key if reg.panel is not None else None],
    }

    def cols(kinds) -> dict[str, str]:
        return {c: why for k, why in kinds.items() for c in columns[k] if c is not None}

    enc = cols(latent)
    more = {c: why for c, why in cols(scoring).items() if c not in enc}
    registered = [k for k, _ in reg.obs_columns()]
    return {
        "latent": enc,
        "scoring_only": more,
        "not_read": [c for c in registered if c not in enc and c not in more],
    }


def _obs_lines(obs: dict[str, Any] | None) -> list[tuple[str, str]]:
    """What a new sample needs: the encoder's columns, the scoring methods' other columns."""
    if obs is None:
        return [("new samples", "unknown (the config cannot be read)")]

    def listing(d: dict[str, str]) -> str:
        return "; ".join(f"obs[{c!r}] ({why})" for c, why in d.items()) or "no obs column"

    return [
        ("latent space reads", listing(obs["latent"])),
        ("scoring also reads", listing(obs["scoring_only"])),
        (
            "new samples",
            "columns not read by the latent space may be absent or hold categories never seen "
            "in training; the scoring methods need training categories for theirs (or "
            "--unseen-as COLUMN=CATEGORY)",
        ),
    ]


def _provenance_lines(prov: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Where the model came from (a model hub folder's metadata and model card)."""
    if not prov:
        return []
    lines = []
    for key, label in (
        ("source", "source"),
        ("description", "description"),
        ("license", "license"),
        ("training_data_url", "training data"),
        ("training_code_url", "training code"),
        ("trained_with", "trained with"),
        ("citation", "citation"),
    ):
        value = prov.get(key)
        if value:
            lines.append((label, one_line(value) if isinstance(value, str) else str(value)))
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..bundle import read_manifest
    from ..bundle.format import VALIDATION_WIDENED
    from ..maths import native
    from ..models.base import Module, sparse_encoders
    from ..models.registry import MODELS, feature_name

    root = Path(args.bundle)
    man = read_manifest(root, check_files=False)
    c, reg = man.config, man.registry
    # what the config means is the model's module's to say (a class this runtime does not
    # know gets the generic lines: info still shows what the bundle holds)
    module = MODELS[man.model_class].load("module") if man.model_class in MODELS else Module
    described = dict(module.describe(c, reg))
    arch = described.pop("architecture", "")
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
        "digest": man.digest,
        "n_genes": man.n_genes,
        "genes": list(man.genes),
        "n_latent": c.get("n_latent"),
        "n_hidden": c.get("n_hidden"),
        "n_layers": c.get("n_layers"),
        "gene_likelihood": c.get("gene_likelihood"),
        "dispersion": c.get("dispersion", c.get("gene_dispersion")),
        "latent_distribution": c.get("latent_distribution"),
        "library_size": described.get("library size"),
        "model": described,
        "layer": reg.layer,
        "batch": cat(reg.batch),
        "labels": cat(reg.labels),
        "categorical_covariates": [cat(f) for f in reg.categorical_covariates],
        "continuous_covariates": list(reg.continuous_covariates),
        "size_factor_key": reg.size_factor_key,
        "obs_inputs": _obs_inputs(man),
        "provenance": man.extra.get("provenance"),
        **({"proteins": _proteins(reg, c)} if reg.proteins is not None else {}),
        **({"panel": cat(reg.panel)} if reg.panel is not None else {}),
        **({"modalities": reg.modalities} if reg.modalities is not None else {}),
        "versions": {**versions, "opset": opset},
        "runtime_version": __version__,
        "likelihood_kernel": native.describe(),
        "validation": {
            k: man.validation.get(k) for k in ("atol", "rtol", "seed", VALIDATION_WIDENED)
        },
        "sparse_encoders": sparse_encoders(man),
        "config": c,
        "files": files,
        "checksums_ok": all(f["ok"] is not False for f in files),
    }
    if args.json:
        print_json(info)
        return 0

    def cats(field) -> str:
        n = field.n_categories
        return f"{n} {'category' if n == 1 else 'categories'}: {preview(field.categories)}"

    from ..data.mudata import obs_location

    def obs(what: str, key: str) -> str:  # a MuData model: the modality setup_mudata named
        return f"{obs_location(reg, what)}[{key!r}]"

    batch = (
        f"{obs('batch_key', reg.batch.key)} ({cats(reg.batch)})"
        if reg.batch.key is not None
        else "none (trained without a batch key)"
    )
    labels = (
        f"{obs('labels_key', reg.labels.key)} ({cats(reg.labels)})"
        if reg.labels.key is not None
        else "none (trained without a labels key)"
    )
    cat_covs = (
        "; ".join(
            f"{obs('categorical_covariate_keys', f.key)} ({cats(f)})"
            for f in reg.categorical_covariates
        )
        or "none"
    )
    cont_covs = (
        ", ".join(obs("continuous_covariate_keys", k) for k in reg.continuous_covariates) or "none"
    )
    expression = f"layers[{reg.layer!r}]" if reg.layer else "X"
    if reg.modalities is not None:
        expression = f"mdata.mod[{reg.modalities.get('X')!r}].{expression}"
    ver_names = (
        ("scvi-tools", "scvi_tools"),
        ("torch", "torch"),
        ("onnx", "onnx"),
        ("onnxruntime", "onnxruntime"),
        ("scvi-onnx", "scvi_onnx"),
    )
    ver = ", ".join(f"{label} {versions[k]}" for label, k in ver_names if k in versions)
    lines = [
        ("bundle", str(root)),
        ("model", f"{man.model_class} (module {c.get('module_class')}; {arch})"),
        ("schema version", str(man.schema_version)),
        ("digest", man.digest),
        (feature_name(man.model_class), f"{man.n_genes} ({preview(man.genes)})"),
        ("n_latent", str(c.get("n_latent"))),
        *described.items(),
        ("expression from", expression),
        ("batch", batch),
        ("labels", labels),
        ("categorical covariates", cat_covs),
        ("continuous covariates", cont_covs),
        (
            "size factor key",
            obs("size_factor_key", reg.size_factor_key) if reg.size_factor_key else "none",
        ),
    ]
    if reg.proteins is not None:
        pr = info["proteins"]
        lines.append(("proteins", f"{pr['n_proteins']} ({preview(pr['names'])}) from {pr['from']}"))
        if pr["missing_in_some_panels"]:
            lines.append(("protein panels", "some proteins missing in some panels (a mask)"))
    if reg.panel is not None:
        lines.append(("panel", f"{obs('panel_key', reg.panel.key)} ({cats(reg.panel)})"))
    if reg.modalities is not None:
        mods = sorted({m for m in reg.modalities.values() if m is not None})
        lines.append(("MuData modalities", ", ".join(mods)))
    sparse = info["sparse_encoders"]
    if sparse is not None:
        d = sparse["density"]
        seen = (
            f"training data {100 * d:.1f}% non-zero" if d is not None else "training data unknown"
        )
        text = (
            f"the CPU's default ({seen})"
            if sparse["cpu_default"]
            else f"on request, input_layer='sparse' ({seen}: the CPU runs the dense ones)"
        )
        lines.append(("sparse encoders", text))
    lines += [
        *_obs_lines(info["obs_inputs"]),
        *_provenance_lines(info["provenance"]),
        ("exported with", f"{ver}; ONNX opset {opset}" if ver else f"ONNX opset {opset}"),
        (
            "this runtime",
            f"scvi-onnx {__version__}; likelihood kernel {info['likelihood_kernel']}",
        ),
        (
            "validation",
            f"atol {man.validation.get('atol')}, rtol {man.validation.get('rtol')}"
            + widened_text(man.validation),
        ),
    ]
    width = max(len(k) for k, _ in lines) + 1
    for k, v in lines:
        print(f"{k + ':':<{width}} {v}")
    print("files:")
    name_w = max(len(f["name"]) for f in files)
    for f in files:
        size = "missing" if f["size"] is None else human_size(f["size"])
        check = {None: "", True: "sha256 ok", False: "CHECKSUM MISMATCH"}[f["ok"]]
        if f["size"] is None:
            check = "MISSING"
        print(f"  {f['name']:<{name_w}}  {size:>10}  {check}".rstrip())
    if not info["checksums_ok"]:
        logger.warning("bundle files are missing or altered; the bundle will not load")
    return 0
