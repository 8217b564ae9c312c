"""How CT-like a (synthetic) volume is, and how well it follows its conditioning mask.

Cheap, label-free measures used by ``medsyn publish`` (mask adherence), by the demo's log and by
benchmarks/quality.py:

- tissue classes by HU (outside air and airways, lung parenchyma, soft tissue and fat, bone), their
  volume fractions and the 1-D Wasserstein distance between HU distributions;
- body and lung shape: the body (largest connected component above -500 HU, holes filled per axial
  slice) and the lungs (lung-range voxels inside it);
- nodule contrast: mean HU inside each conditioning-mask component minus the mean HU of a shell of
  ``shell`` voxels around it (what makes a nodule visible where its mask says), and that contrast
  over the shell's HU spread (contrast-to-noise ratio: a noisy volume has chance contrasts).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

from medsyn_site.imaging import body_mask, label_nodules, lung_region

# (name, lowest HU, highest HU): the thresholds sit between the tissues' typical values
TISSUES = (("air", -np.inf, -950.0), ("lung", -950.0, -500.0), ("soft", -500.0, 250.0), ("bone", 250.0, np.inf))


def tissue_fractions(hu: np.ndarray) -> dict[str, float]:
    """Volume fraction of each tissue class (sums to 1)."""
    hu = np.asarray(hu, np.float32)
    return {name: float(((hu >= lo) & (hu < hi)).mean()) for name, lo, hi in TISSUES}


def hu_distance(a: np.ndarray, b: np.ndarray, max_voxels: int = 200_000, seed: int = 0) -> float:
    """1-D Wasserstein distance (HU) between the voxel HU distributions of two volumes (subsampled)."""
    rng = np.random.default_rng(seed)

    def sub(x):
        x = np.asarray(x, np.float32).ravel()
        return x if x.size <= max_voxels else x[rng.choice(x.size, max_voxels, replace=False)]
    return float(stats.wasserstein_distance(sub(a), sub(b)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


@dataclass
class NoduleContrast:
    voxels: int
    inside_hu: float
    shell_hu: float
    shell_std_hu: float

    @property
    def contrast(self) -> float:
        return self.inside_hu - self.shell_hu

    @property
    def cnr(self) -> float:
        """Contrast-to-noise ratio: contrast over the shell's HU spread (noise alone gives ~0 +- 1/sqrt(n))."""
        return self.contrast / max(self.shell_std_hu, 1.0)


def nodule_contrasts(hu: np.ndarray, mask: np.ndarray, shell: int = 2) -> list[NoduleContrast]:
    """Per connected component of ``mask``: mean HU inside, mean HU of the surrounding shell."""
    hu = np.asarray(hu, np.float32)
    labels, n = label_nodules(mask)
    out = []
    for lab, box in zip(range(1, n + 1), ndimage.find_objects(labels)):
        pad = tuple(slice(max(s.start - shell - 1, 0), s.stop + shell + 1) for s in box)
        inside = labels[pad] == lab
        ring = ndimage.binary_dilation(inside, iterations=shell) & ~(labels[pad] > 0)
        if ring.any():
            out.append(NoduleContrast(int(inside.sum()), float(hu[pad][inside].mean()), float(hu[pad][ring].mean()),
                                      float(hu[pad][ring].std())))
    return out


def summary(hu: np.ndarray, mask: np.ndarray) -> dict:
    """The per-volume numbers the demo prints and publish records."""
    body = body_mask(hu)
    nod = nodule_contrasts(hu, mask)
    return {"tissue": tissue_fractions(hu), "body_fraction": float(body.mean()),
            "lung_fraction": float(lung_region(hu, body).mean()),
            "nodules": len(nod),
            "nodule_contrast_hu": float(np.mean([c.contrast for c in nod])) if nod else None,
            "nodule_cnr": float(np.mean([c.cnr for c in nod])) if nod else None}


def mean_summary(volumes: list[tuple[np.ndarray, np.ndarray]], reference_hu: np.ndarray) -> dict:
    """``summary`` averaged over (HU, mask) volumes, plus each volume's HU distance to the pooled
    ``reference_hu`` voxels (the real scans), averaged."""
    rows = [summary(hu, mask) for hu, mask in volumes]

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else None
    return {"cases": len(rows),
            "tissue": {k: float(np.mean([r["tissue"][k] for r in rows])) for k in rows[0]["tissue"]},
            "body_fraction": mean("body_fraction"), "lung_fraction": mean("lung_fraction"),
            "hu_w1": float(np.mean([hu_distance(hu, reference_hu) for hu, _ in volumes])),
            "nodule_contrast_hu": mean("nodule_contrast_hu"), "nodule_cnr": mean("nodule_cnr")}
