"""Memorization audit: is a synthetic volume closer to a training volume than real unseen scans are?

Similarity is the normalized cross-correlation (NCC) of volumes resampled to a coarse common grid,
maximised over small shifts, on the whole volume and on nodule-centred crops. The threshold is
calibrated on held-out real scans (the training cohort's val/test splits): the highest similarity any
of them has to its nearest training scan. A synthetic volume above it is flagged.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

WHOLE_GRID = (24, 32, 32)  # z, y, x
CROP_MM = 32.0
CROP_GRID = (12, 12, 12)
HU_CLIP = (-1024.0, 1024.0)


def _zscore(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    return (a - a.mean()) / max(float(a.std()), 1e-6)


def _resize(a: np.ndarray, grid) -> np.ndarray:
    return ndimage.zoom(a.astype(np.float32), [g / n for g, n in zip(grid, a.shape)], order=1, grid_mode=True,
                        mode="nearest")


def whole_feature(hu: np.ndarray) -> np.ndarray:
    return _zscore(_resize(np.clip(hu, *HU_CLIP), WHOLE_GRID))


def crop_features(hu: np.ndarray, mask: np.ndarray, spacing_zyx) -> list[np.ndarray]:
    """One feature per nodule: a CROP_MM cube around its centroid, resampled to CROP_GRID."""
    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))
    half = np.ceil(CROP_MM / 2 / np.asarray(spacing_zyx)).astype(int)
    padded = np.pad(np.clip(hu, *HU_CLIP), [(h, h) for h in half], mode="edge")
    out = []
    for c in ndimage.center_of_mass(mask > 0, labels, range(1, n + 1)):
        c = np.rint(c).astype(int) + half
        box = tuple(slice(ci - h, ci + h) for ci, h in zip(c, half))
        out.append(_zscore(_resize(padded[box], CROP_GRID)))
    return out


def ncc(a: np.ndarray, b: np.ndarray, shift: int = 1) -> float:
    """Max over shifts in [-shift, shift]^3 of the correlation of two z-scored arrays."""
    best = -1.0
    for d in itertools.product(range(-shift, shift + 1), repeat=3):
        sl_a = tuple(slice(max(0, k), n + min(0, k)) for k, n in zip(d, a.shape))
        sl_b = tuple(slice(max(0, -k), n + min(0, -k)) for k, n in zip(d, b.shape))
        x, y = a[sl_a], b[sl_b]
        best = max(best, float(((x - x.mean()) * (y - y.mean())).mean() / max(x.std() * y.std(), 1e-6)))
    return best


def nearest(feat: np.ndarray, bank: list[np.ndarray]) -> float:
    return max((ncc(feat, f) for f in bank), default=float("nan"))


@dataclass
class Features:
    whole: np.ndarray
    crops: list[np.ndarray]

    @classmethod
    def of(cls, hu: np.ndarray, mask: np.ndarray, spacing_xyz) -> "Features":
        return cls(whole_feature(hu), crop_features(hu, mask, tuple(spacing_xyz)[::-1]))


def nn_scores(f: Features, train: list[Features]) -> dict:
    """Nearest-training-neighbour similarity of one volume: whole and best nodule crop."""
    crops = [c for t in train for c in t.crops]
    return {"whole": nearest(f.whole, [t.whole for t in train]),
            "crop": max((nearest(c, crops) for c in f.crops), default=float("nan"))}


def calibrate(heldout: list[Features], train: list[Features], floor: float = 0.9) -> dict:
    """Thresholds: the highest nearest-neighbour similarity of any held-out real scan (its nodule
    crops, for the crop threshold), but never below ``floor``: with few held-out scans (or few
    nodules) the maximum is a poor estimate, and chance correlations of noise stay far below it."""
    scores = [nn_scores(f, train) for f in heldout]
    whole = [s["whole"] for s in scores]
    crop = [s["crop"] for s in scores if np.isfinite(s["crop"])]
    calibrated = {"whole": max(whole), "crop": max(crop) if crop else float("nan")}
    return {k: max(v, floor) if np.isfinite(v) else floor for k, v in calibrated.items()} | {
        "calibrated": calibrated, "floor": floor, "heldout_scores": scores}


def flagged(score: dict, thresholds: dict) -> list[str]:
    return [k for k in ("whole", "crop") if np.isfinite(score[k]) and score[k] > thresholds[k]]
