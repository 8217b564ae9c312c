"""Nodule-level detection beside Dice (the Dice of a 3-voxel nodule is unstable): each ground-truth
nodule is a 26-connected component of the mask; it is found when a predicted component overlaps it.
A predicted component that overlaps no nodule is a false positive. Sizes are equivalent-sphere
diameters; types come from the cohort's nodule list (its ``center_voxel``) where it has one."""
from __future__ import annotations

import numpy as np

from medsyn_site.evaluate.stats import stratum
from medsyn_site.imaging import component_types, diameters_mm, label_nodules, nodule_codes


def detect(gt: np.ndarray, pred: np.ndarray, spacing_zyx, nodules=()) -> dict:
    """{"nodules": [{"diameter_mm", "type", "found"}], "false_positives": n} for one case.
    ``gt``/``pred`` are (z, y, x) label arrays; ``nodules`` the cohort's records (type, center_voxel
    as x, y, z) to name each component's type ("unknown" where none is listed)."""
    gl, n_gt = label_nodules(gt)
    pl, n_pred = label_nodules(pred)
    types = dict(enumerate(component_types(nodule_codes(gt, nodules))[1], start=1))
    sizes = diameters_mm(gl, spacing_zyx)
    hit = np.zeros(n_gt + 1, bool)
    overlapping = (gl > 0) & (pl > 0)
    hit[np.unique(gl[overlapping])] = True
    out = [{"diameter_mm": round(sizes[i - 1], 2),
            "type": types.get(i, "unknown"), "found": bool(hit[i])} for i in range(1, n_gt + 1)]
    true_pred = set(np.unique(pl[overlapping]).tolist())
    return {"nodules": out, "false_positives": int(n_pred - len(true_pred - {0}))}


def summarise(cases: list[dict]) -> dict:
    """Sensitivity overall, by size and by type ({"found", "of", "sensitivity"} each), and false
    positives per case, over the per-case results of ``detect``."""
    groups: dict[str, list[bool]] = {"all": []}
    for case in cases:
        for n in case["nodules"]:
            for key in ("all", f"size {stratum(n['diameter_mm'])}", f"type {n['type']}"):
                groups.setdefault(key, []).append(n["found"])
    res = {k: {"found": int(sum(v)), "of": len(v), "sensitivity": float(np.mean(v)) if v else float("nan")}
           for k, v in groups.items()}
    res["fp_per_case"] = float(np.mean([c["false_positives"] for c in cases])) if cases else float("nan")
    return res
