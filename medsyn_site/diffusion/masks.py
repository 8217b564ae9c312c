"""Where the conditioning masks for sampling come from.

  cohort:DIR    the masks of a cohort's train split, verbatim (the paper's general utility test)
  request:FILE  the cases a request file lists (medsyn_site/request.py; the targeted test), as many
                per mask and in the mask mode it asks (relocated unless it asks verbatim)
  relocate:DIR  privacy-preserving: each train mask's nodules, flipped and moved to random places
                inside that scan's lungs (against the pleura if they were; inside ones where the
                cohort's lungs all but always are), so no real mask is reused verbatim

A plain DIR means cohort:DIR. Publishing samples made from verbatim real masks needs an explicit flag.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from medsyn_site import request as request_contract
from medsyn_site.config import SAMPLE
from medsyn_site.data.cohort import Cohort, CohortError
from medsyn_site.imaging import label_nodules, lung_mask, nodule_codes, nodule_records, pleural_depth


@dataclass
class Conditioning:
    mask: sitk.Image     # 0/1, the synthetic case's mask file
    codes: np.ndarray    # z, y, x: imaging.NODULE_CODES per voxel (the nodules' types)
    nodules: list[dict]  # cohort.json's records of the mask's nodules


@dataclass
class MaskJob:
    source_id: str  # the conditioning case's id in its cohort (hashed before it is published)
    mode: str  # verbatim | relocated
    replicate: int
    cohort: Cohort

    def conditioning(self, seed: int) -> Conditioning:
        """The mask a volume is sampled from, its nodules' types and records (relocated for a seed)."""
        image, mask = self.cohort.read(self.source_id)
        rec = self.cohort.case(self.source_id)
        codes = nodule_codes(sitk.GetArrayFromImage(mask), rec.nodules)
        if self.mode == "relocated":
            codes = relocate_nodules(codes, sitk.GetArrayFromImage(image),
                                     np.random.default_rng([seed, self.replicate, _int(self.source_id)]),
                                     prior=lung_prior(str(self.cohort.root), codes.shape))
            mask = sitk.GetImageFromArray((codes > 0).astype(np.uint8))
            mask.CopyInformation(image)
            return Conditioning(mask, codes, nodule_records(codes, rec.spacing[::-1]))
        return Conditioning(mask, codes, [n.model_dump(mode="json") for n in rec.nodules])


PRIOR_CASES = 32  # scans a cohort's lung prior is averaged over (evenly spread over its cases)
PRIOR_GRID = 128  # at most this many voxels per axis on the grid the prior is kept at


def lung_prior(root: str, shape_zyx: tuple[int, ...]) -> np.ndarray:
    """The share of a cohort's scans (at most ``PRIOR_CASES``) whose lung cavity holds each voxel of a
    ``shape_zyx`` volume at the same relative position (each scan's cavity, nodules and vessels filled
    in, resized to the shape; the network's coordinate channels see positions the same way, as
    fractions of the volume): where the generator draws lungs, since it sees only positions."""
    return _resized(_cohort_lungs(root), shape_zyx).numpy()


def _resized(volume: torch.Tensor, shape_zyx) -> torch.Tensor:
    """Trilinear, corner to corner (position k / (n - 1) on both grids, as ``coordinate_grid``)."""
    return torch.nn.functional.interpolate(volume[None, None], size=tuple(shape_zyx), mode="trilinear",
                                           align_corners=True)[0, 0]


@lru_cache(maxsize=2)
def _cohort_lungs(root: str) -> torch.Tensor:
    """``lung_prior`` on the grid of the cohort's most common shape (at most ``PRIOR_GRID`` a side),
    read once per process: a real cohort's cases differ in shape."""
    cohort = Cohort(root)
    cases = [cohort.cases[int(k)] for k in np.linspace(0, len(cohort.cases) - 1, min(len(cohort.cases), PRIOR_CASES))]
    shapes = Counter(tuple(rec.shape[::-1]) for rec in cases)
    grid = tuple(min(n, PRIOR_GRID) for n in shapes.most_common(1)[0][0])
    total = torch.zeros(grid)
    for rec in cases:
        hu, mask = cohort.arrays(rec.id)
        total += _resized(torch.from_numpy(pleural_depth(lung_mask(hu) | (mask > 0)) > 0).float(), grid)
    return total / len(cases)


def _int(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little")


def relocate_nodules(mask: np.ndarray, hu: np.ndarray, rng: np.random.Generator, tries: int = 400,
                     prior: np.ndarray | None = None, clearance: float = 0.9) -> np.ndarray:
    """Each nodule of ``mask``, randomly flipped, placed at a random spot inside the lungs of ``hu``
    where it fits whole, touches no other nodule, and touches the pleura (the chest wall or the
    mediastinum) if and only if it did where it was; it keeps its value (a 0/1 mask stays 0/1, nodule
    codes keep their types). Placed anywhere in the lungs, nodules land against the pleura as often
    as its share of the lungs' room says (on the phantom benchmark 33 % of ground-glass nodules
    against 22 % where they were, 39 % of solid ones against 46 %), and there the pleura's partial
    volume changes how they look: relocation moves a nodule, not what it sits against.

    The generator does not see this scan's lungs, only positions, and draws lungs of its own: where
    scans differ, its chest wall may run through a nodule placed inside this scan's lungs (a
    ground-glass nodule then shows the wall's density). With ``prior`` (``lung_prior``: the share of
    the cohort's scans with lung at each voxel), an interior nodule goes where that share is at
    least ``clearance`` on the nodule and every voxel around it, and one against the pleura where
    at least half of them have lung on the nodule (inside the typical lungs, not in their wall) and
    fewer than half just beside it (against the typical wall: where this scan's lungs end before the
    typical ones, a nodule at its pleura would lie inside the generator's lungs, touching nothing).
    Each rule is dropped in turn after ``tries`` trials: the prior, then the contact; a nodule that
    fits nowhere is dropped rather than placed badly."""
    labels, n = label_nodules(mask)
    lungs = lung_mask(hu)
    depth = pleural_depth(lungs | (mask > 0))
    # where the prior holds an interior nodule's voxel (with every voxel around it) or a pleural one's
    # (a pleural one also reaches the typical wall: a voxel beside it where fewer than half the scans have lung)
    typical = None if prior is None else ndimage.minimum_filter(prior, size=3)
    held = None if prior is None else {False: typical >= clearance, True: prior >= 0.5}
    at_wall = None if prior is None else typical < 0.5
    lung_voxels = np.argwhere(lungs)
    out = np.zeros_like(mask, dtype=np.uint8)
    taken = np.zeros(mask.shape, bool)  # the placed nodules and the voxels that touch them
    around = np.stack(np.meshgrid(*[(-1, 0, 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for box, lab in zip(ndimage.find_objects(labels), range(1, n + 1)):
        shape = labels[box] == lab
        value = mask[box][shape].max()
        pleural = bool(depth[box][shape].min() <= 1)
        for axis in range(3):
            if rng.random() < 0.5:
                shape = np.flip(shape, axis)
        offsets = np.argwhere(shape) - np.array(shape.shape) // 2
        # (trials, keep the contact, keep the prior): each rule dropped in turn
        stages = [(tries, True, True)] if held is not None else []
        for trials, contact, inside in stages + [(tries, True, False), (200, False, False)]:
            idx = _place(rng, trials if len(lung_voxels) else 0, lung_voxels, offsets, mask.shape,
                         lambda idx: (lungs[idx].all() and not taken[idx].any()
                                      and (not contact or (depth[idx].min() <= 1) == pleural)
                                      and (not inside or (held[pleural][idx].all()
                                                          and (not pleural or at_wall[idx].any())))))
            if idx is not None:
                out[idx] = value
                halo = np.unique((np.stack(idx, 1)[:, None] + around).reshape(-1, 3), axis=0)
                halo = halo[np.all((halo >= 0) & (halo < mask.shape), 1)]
                taken[tuple(halo.T)] = True
                break
    return out


def _place(rng, trials: int, lung_voxels, offsets, shape, fits):
    """The voxel index of a nodule (``offsets`` about its centre) at the first of ``trials`` random
    lung voxels where it lies inside the volume and ``fits``; None if none."""
    for _ in range(trials):
        vox = lung_voxels[rng.integers(len(lung_voxels))] + offsets
        if np.all((vox >= 0) & (vox < shape)):
            idx = tuple(vox.T)
            if fits(idx):
                return idx
    return None


def mask_jobs(source: str, per_mask: int, request_cohort: str | Path | None = None,
              max_volumes: int = SAMPLE.max_volumes) -> list[MaskJob]:
    """The conditioning jobs for ``source`` (see the module doc), ``per_mask`` replicates each (a
    request says its own number). A request is input from another party: its cases are found in
    ``request_cohort``, the folder the SITE names (the request's own ``cohort`` field is never
    followed), and it may ask for at most ``max_volumes`` volumes (refused before any sampling)."""
    kind, _, where = source.partition(":") if ":" in source else ("cohort", "", source)
    if kind == "request":
        req = request_contract.read(where)
        if len(req.cases) * req.per_mask > max_volumes:
            raise request_contract.RequestError(
                f"{where}: asks for {len(req.cases) * req.per_mask} volumes ({len(req.cases)} case(s) x per_mask "
                f"{req.per_mask}), above this site's limit of {max_volumes} per request (--max-volumes)")
        if request_cohort is None:
            raise CohortError(f"{where}: give the cohort that holds the request's cases (--request-cohort DIR); "
                              "the site chooses it, never the request")
        cohort = Cohort(request_cohort)
        ids = [cohort.case(c).id for c in req.cases]
        mode, per_mask = req.mask_mode, req.per_mask
    elif kind in ("cohort", "relocate"):
        cohort = Cohort(where)
        ids = [c.id for c in cohort.split("train")]
        mode = "relocated" if kind == "relocate" else "verbatim"
    else:
        raise CohortError(f"{source}: unknown mask source (use cohort:DIR, request:FILE or relocate:DIR)")
    if not ids:
        raise CohortError(f"{source}: no masks to condition on")
    return [MaskJob(i, mode, k, cohort) for i in ids for k in range(per_mask)]
