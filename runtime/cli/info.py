"""``scvi-onnx info``: what a bundle holds and what its input needs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .common import human_size, preview, print_json

logger = logging.getLogger("scvi_onnx.cli")


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


def cmd_info(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..bundle import read_manifest
    from ..models.base import Module
    from ..models.registry import MODELS

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
        "n_genes": man.n_genes,
        "genes": list(man.genes),
        "n_latent": c.get("n_latent"),
        "n_hidden": c.get("n_hidden"),
        "n_layers": c.get("n_layers"),
        "gene_likelihood": c.get("gene_likelihood"),
        "dispersion": c.get("dispersion"),
        "latent_distribution": c.get("latent_distribution"),
        "library_size": described.get("library size"),
        "model": described,
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
        print_json(info)
        return 0

    def cats(field) -> str:
        n = field.n_categories
        return f"{n} {'category' if n == 1 else 'categories'}: {preview(field.categories)}"

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
    lines = [
        ("bundle", str(root)),
        ("model", f"{man.model_class} (module {c.get('module_class')}; {arch})"),
        ("schema version", str(man.schema_version)),
        ("genes", f"{man.n_genes} ({preview(man.genes)})"),
        ("n_latent", str(c.get("n_latent"))),
        *described.items(),
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
        size = "missing" if f["size"] is None else human_size(f["size"])
        check = {None: "", True: "sha256 ok", False: "CHECKSUM MISMATCH"}[f["ok"]]
        if f["size"] is None:
            check = "MISSING"
        print(f"  {f['name']:<{name_w}}  {size:>10}  {check}".rstrip())
    if not info["checksums_ok"]:
        logger.warning("bundle files are missing or altered; the bundle will not load")
    return 0
