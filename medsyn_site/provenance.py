"""The provenance contract: what made every synthetic file. ``medsyn sample`` writes it, signed
with the site key (HMAC-SHA256); ``medsyn publish`` releases only files whose sha256 matches a
correctly signed entry, so a line added by hand (without the key) is refused."""
from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from medsyn_site.atomic import atomic_write_text
from medsyn_site.errors import MedsynError

FILE = "provenance.json"
FORMAT = "medsyn-provenance"


class ProvenanceError(MedsynError):
    """Provenance missing, malformed or not matching; the message names the file."""


def _canonical(entry: dict, header: dict) -> bytes:
    body = {k: v for k, v in entry.items() if k != "signature"}
    return json.dumps({"entry": body, "header": header}, sort_keys=True, separators=(",", ":")).encode()


def sign(entry: dict, header: dict, key: bytes) -> dict:
    return {**entry, "signature": hmac.new(key, _canonical(entry, header), hashlib.sha256).hexdigest()}


def verify(entry: dict, header: dict, key: bytes) -> bool:
    good = hmac.new(key, _canonical(entry, header), hashlib.sha256).hexdigest()
    return hmac.compare_digest(good, str(entry.get("signature", "")))


def write(root: Path, header: dict, entries: list[dict], key: bytes) -> Path:
    doc = {"format": FORMAT, "version": 1, **header, "files": [sign(e, header, key) for e in entries]}
    return atomic_write_text(Path(root) / FILE, json.dumps(doc, indent=1))


def read(root: Path) -> tuple[dict, list[dict]]:
    """(header, entries) of a synthetic cohort's provenance.json."""
    path = Path(root) / FILE
    if not path.is_file():
        raise ProvenanceError(f"{path}: missing (only data made by `medsyn sample` can be published)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ProvenanceError(f"{path}: not valid JSON: {e}") from e
    if doc.get("format") != FORMAT or not isinstance(doc.get("files"), list):
        raise ProvenanceError(f"{path}: not a {FORMAT} file")
    header = {k: v for k, v in doc.items() if k not in ("format", "version", "files")}
    return header, doc["files"]
