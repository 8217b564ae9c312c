"""The provenance contract: what made every synthetic file. ``medsyn sample`` writes it, signed
with the site key (HMAC-SHA256); ``medsyn publish`` releases only files whose sha256 matches a
correctly signed entry, so a line added by hand (without the key) is refused."""
from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from medsyn_site.atomic import atomic_write_text, read_json
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
    doc = read_json(path, ProvenanceError, "missing (only data made by `medsyn sample` can be published)")
    if doc.get("format") != FORMAT or not isinstance(doc.get("files"), list):
        raise ProvenanceError(f"{path}: not a {FORMAT} file")
    header = {k: v for k, v in doc.items() if k not in ("format", "version", "files")}
    return header, doc["files"]


# -- the training cohort a model is bound to ----------------------------------------------------------
COHORT_FILE = "training_cohort.json"


def cohort_identity(root: str | Path) -> str:
    """sha256 over a cohort's cohort.json and the sha256 of every image and mask file it lists (read
    from disk, so a file changed since the index was written changes the identity)."""
    from medsyn_site.atomic import sha256_file
    from medsyn_site.data.cohort import INDEX, Cohort, image_path, mask_path

    root = Path(root)
    cohort = Cohort(root)
    h = hashlib.sha256(sha256_file(root / INDEX).encode())
    for rec in cohort.cases:
        for path in (image_path(root, rec.id), mask_path(root, rec.id)):
            h.update(f"{rec.id}:{path.parent.name}:{sha256_file(path)}".encode())
    return h.hexdigest()


def record_training_cohort(run_root: Path, cohort_dir: str | Path) -> str:
    """Write RUN/training_cohort.json at the start of training; a resumed run must use the same cohort."""
    ident = cohort_identity(cohort_dir)
    path = Path(run_root) / COHORT_FILE
    if path.is_file():
        old = json.loads(path.read_text()).get("identity")
        if old != ident:
            raise ProvenanceError(f"{path}: this run was trained on another cohort (identity {old[:12]}...); "
                                  f"{cohort_dir} has {ident[:12]}...: resume with the run's own cohort")
        return ident
    atomic_write_text(path, json.dumps({"identity": ident, "cohort": str(Path(cohort_dir).resolve())}, indent=1))
    return ident


def training_cohort_of(weights: Path) -> str | None:
    """The training cohort identity recorded in the run dir that holds ``weights`` (None if none)."""
    for folder in [weights, *Path(weights).parents][:5]:
        f = folder / COHORT_FILE
        if f.is_file():
            return json.loads(f.read_text())["identity"]
    return None


def check_training_cohort(header: dict, training_cohort: str | Path, where: Path) -> None:
    """``publish`` audits against the cohort the model was trained on, and no other."""
    bound = header.get("training_cohort")
    if bound is None:
        raise ProvenanceError(f"{Path(where) / FILE}: records no training cohort (sampled from a run without "
                              "training_cohort.json); sample again from a run trained with this version")
    ident = cohort_identity(training_cohort)
    allowed = bound if isinstance(bound, list) else [bound]  # a federation run lists each site's cohort
    if ident not in allowed:
        raise ProvenanceError(f"{training_cohort}: not the cohort the model was trained on (its identity "
                              f"{ident[:12]}... is not {', '.join(a[:12] + '...' for a in allowed)} recorded in "
                              f"{Path(where) / FILE}); pass the run's own --training-cohort")
