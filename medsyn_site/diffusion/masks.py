"""Where the conditioning masks for sampling come from.

  cohort:DIR    the masks of a cohort's train split, verbatim (the paper's general utility test)
  request:FILE  the cases listed in a request file (the targeted test; ``medsyn evaluate`` writes it)
  relocate:DIR  privacy-preserving: each train mask's nodules, flipped and moved to random places
                inside that scan's lungs, so no real mask is reused verbatim

A plain DIR means cohort:DIR. Publishing samples made from verbatim real masks needs an explicit flag.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medsyn_site.data.cohort import Cohort, CohortError
from medsyn_site.data.prepare import lung_mask

REQUEST_FORMAT = "medsyn-sample-request"


@dataclass
class MaskJob:
    source_id: str  # the conditioning case's id in its cohort (hashed before it is published)
    mode: str  # verbatim | relocated
    replicate: int
    cohort: Cohort

    def mask(self, seed: int) -> sitk.Image:
        image, mask = self.cohort.read(self.source_id)
        if self.mode == "relocated":
            arr = relocate_nodules(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(image),
                                   np.random.default_rng([seed, self.replicate, _int(self.source_id)]))
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(mask)
            return out
        return mask


def _int(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little")


def relocate_nodules(mask: np.ndarray, hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each nodule of ``mask``, randomly flipped, placed at a random spot inside the lungs of ``hu``
    where it fits whole and touches no other nodule."""
    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))
    lungs = lung_mask(hu)
    out = np.zeros_like(mask, dtype=np.uint8)
    for box, lab in zip(ndimage.find_objects(labels), range(1, n + 1)):
        shape = labels[box] == lab
        for axis in range(3):
            if rng.random() < 0.5:
                shape = np.flip(shape, axis)
        offsets = np.argwhere(shape) - np.array(shape.shape) // 2
        lung_voxels = np.argwhere(lungs)
        for _ in range(200 if len(lung_voxels) else 0):  # random trials: whole nodule in the lungs
            vox = lung_voxels[rng.integers(len(lung_voxels))] + offsets
            if np.all((vox >= 0) & (vox < mask.shape)):
                idx = tuple(vox.T)
                if lungs[idx].all() and not out[idx].any():
                    out[idx] = 1
                    break
        # a nodule with no room in this scan's lungs is dropped rather than placed badly
    return out


def mask_jobs(source: str, per_mask: int) -> list[MaskJob]:
    """The conditioning jobs for ``source`` (see the module doc), ``per_mask`` replicates each."""
    kind, _, where = source.partition(":") if ":" in source else ("cohort", "", source)
    if kind == "request":
        path = Path(where)
        if not path.is_file():
            raise CohortError(f"{path}: request file not found")
        req = json.loads(path.read_text())
        if req.get("format") != REQUEST_FORMAT:
            raise CohortError(f"{path}: not a {REQUEST_FORMAT} file")
        cohort = Cohort(req["cohort"])
        ids = [cohort.case(c).id for c in req["cases"]]
        mode = "verbatim"
    elif kind in ("cohort", "relocate"):
        cohort = Cohort(where)
        ids = [c.id for c in cohort.split("train")]
        mode = "relocated" if kind == "relocate" else "verbatim"
    else:
        raise CohortError(f"{source}: unknown mask source (use cohort:DIR, request:FILE or relocate:DIR)")
    if not ids:
        raise CohortError(f"{source}: no masks to condition on")
    return [MaskJob(i, mode, k, cohort) for i in ids for k in range(per_mask)]


def write_request(path: Path, cohort: str | Path, cases: list[str], reason: str) -> Path:
    """A request for targeted samples (what ``medsyn sample --masks request:FILE`` reads)."""
    from medsyn_site.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps({"format": REQUEST_FORMAT, "cohort": str(Path(cohort).resolve()),
                                               "cases": cases, "reason": reason}, indent=1))
