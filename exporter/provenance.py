"""Where a model came from: a model hub folder's metadata and model card, kept in the bundle.

scvi-tools' ``HubModel`` lays a model out as a folder: ``model.pt``, an optional ``adata.h5ad``,
``_scvi_required_metadata.json`` (``HubMetadata``: scvi-tools and anndata versions, model class,
training data URL) and a model card ``README.md`` (YAML front matter with the license and tags,
then sections with the description, training data and code URLs, and references). A clinic must
be able to say which model made a number: the bundle's manifest keeps all of it
(``extra["provenance"]``), and ``scvi-onnx info`` shows it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from scvi_onnx.bundle import sha256_file

from . import inspect

logger = logging.getLogger(__name__)

HUB_METADATA_FILE = "_scvi_required_metadata.json"
MODEL_CARD_FILE = "README.md"
#: The model card is kept whole up to this many characters (a card is a few KB).
MAX_CARD_CHARS = 200_000


def _front_matter(card: str) -> tuple[dict[str, Any], str]:
    """The YAML front matter of a model card (``---`` ... ``---``) and the body after it."""
    m = re.match(r"\A---\s*\n(.*?)\n---\s*\n?(.*)\Z", card, flags=re.S)
    if not m:
        return {}, card
    try:
        import yaml

        meta = yaml.safe_load(m.group(1)) or {}
    except Exception as e:  # a malformed header does not stop an export: it is kept as text
        logger.warning("the model card's front matter is not valid YAML (%s); kept as text", e)
        meta = {}
    return (meta if isinstance(meta, dict) else {}), m.group(2)


def _section(body: str, title: str) -> str | None:
    """The text of a ``# title`` section of the card, up to the next ``#`` heading."""
    m = re.search(rf"^#+\s*{re.escape(title)}\s*$(.*?)(?=^#+\s|\Z)", body, flags=re.M | re.S | re.I)
    if not m:
        return None
    text = m.group(1).strip()
    return text or None


def _field(body: str, label: str) -> str | None:
    """``**label**: value`` on one line of the card."""
    m = re.search(rf"\*\*{re.escape(label)}\*\*\s*:\s*(\S.*)$", body, flags=re.M | re.I)
    value = m.group(1).strip() if m else None
    return None if value in (None, "", "None", "To be added...") else value


def folder_provenance(folder: Path, scvi_version: str | None = None) -> dict[str, Any]:
    """Provenance of a saved model folder (a model hub folder has the most to say)."""
    # the folder as given (an absolute path would make the manifest, and the bundle's digest,
    # depend on where the export ran); its weights' checksums say which model it was
    prov: dict[str, Any] = {"source": str(folder)}
    # the saved weights' checksums: which files this bundle was made from
    weights = sorted(
        f
        for pattern in ("*model.pt", "*model_params.pt", "*attr.pkl", "*var_names.csv")
        for f in Path(folder).glob(pattern)
        if f.is_file()
    )
    if weights:
        prov["source_sha256"] = {f.name: sha256_file(f) for f in weights}
    if scvi_version:
        prov["trained_with"] = f"scvi-tools {scvi_version}"
    meta_file = folder / HUB_METADATA_FILE
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            logger.warning("cannot read %s (%s); exported without it", meta_file, e)
            meta = None
        if isinstance(meta, dict):
            prov["layout"] = "scvi-tools model hub"
            prov["hub_metadata"] = meta
            if meta.get("scvi_version"):
                anndata = (
                    f", anndata {meta['anndata_version']}" if meta.get("anndata_version") else ""
                )
                prov["trained_with"] = f"scvi-tools {meta['scvi_version']}{anndata}"
            if meta.get("training_data_url"):
                prov["training_data_url"] = meta["training_data_url"]
    card_file = folder / MODEL_CARD_FILE
    if card_file.is_file():
        try:
            card = card_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            logger.warning("cannot read %s (%s); exported without it", card_file, e)
            card = None
        if card is not None:
            if len(card) > MAX_CARD_CHARS:
                logger.warning("the model card is longer than %d characters: cut", MAX_CARD_CHARS)
                card = card[:MAX_CARD_CHARS]
            front, body = _front_matter(card)
            prov["model_card"] = card
            if front:
                prov["model_card_metadata"] = json.loads(json.dumps(front, default=str))
            license_ = front.get("license")
            if license_:
                prov["license"] = str(license_)
            for key, label in (
                ("training_data_url", "Training data url"),
                ("training_code_url", "Training Code URL"),
            ):
                value = _field(body, label)
                if value and key not in prov:
                    prov[key] = value
            for key, title in (("description", "Model Description"), ("citation", "References")):
                text = _section(body, title)
                if text and text != "To be added...":
                    prov[key] = text
    return prov


def model_provenance(model: Any) -> dict[str, Any]:
    """Provenance of an in-memory model: the scvi-tools version that trained it, as its
    registry records it."""
    version = inspect.trained_with(model)
    prov: dict[str, Any] = {"source": f"in-memory {type(model).__name__} model"}
    if version:
        prov["trained_with"] = f"scvi-tools {version}"
    return prov
