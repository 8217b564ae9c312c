"""Training patches: random 3-D crops of CT + mask + the matching crop of the whole-volume
coordinate grid, biased towards nodules.

Sample ``i`` is a pure function of (seed, i): which case, which crop centre (MONAI's
pos/neg crop-centre generator), so a resumed run sees exactly the data an uninterrupted one would,
and DataLoader workers need no shared random state. Volumes are cached in memory once.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from monai.transforms.utils import generate_pos_neg_label_crop_centers, map_binary_to_indices
from torch.utils.data import Dataset

from medsyn_site.data.cohort import Cohort
from medsyn_site.diffusion.model import coordinate_grid, hu_to_unit
from medsyn_site.errors import MedsynError

log = logging.getLogger(__name__)


class PatchError(MedsynError):
    """A patch cannot be cut from the cohort (e.g. the patch is larger than a volume)."""


class PatchDataset(Dataset):
    """``dataset[i]`` -> dict(image (1,z,y,x) in [-1,1], mask (1,z,y,x), coords (3,z,y,x), case)."""

    def __init__(self, cohort: Cohort, split: str, patch_xyz, window, pos_fraction: float,
                 seed: int, length: int = 2 ** 62):
        self.patch = tuple(int(p) for p in patch_xyz[::-1])  # z, y, x
        self.window, self.pos_fraction, self.seed, self.length = window, pos_fraction, seed, length
        self.cases = [c for c in cohort.cases if c.split == split]
        if not self.cases:
            raise PatchError(f"{cohort.root}: no cases in the {split!r} split to train on")
        small = [c.id for c in self.cases if any(p > s for p, s in zip(self.patch, c.shape[::-1]))]
        if small:
            raise PatchError(f"{cohort.root}: patch {tuple(patch_xyz)} (x, y, z) is larger than the "
                             f"volume of case(s) {', '.join(small[:5])} (shape {self.cases[0].shape})")
        self.images, self.masks, self.fg, self.bg = [], [], [], []
        for rec in self.cases:
            image, mask = cohort.arrays(rec.id)
            fg, bg = map_binary_to_indices(mask > 0)
            self.images.append(image)
            self.masks.append(mask)
            self.fg.append(np.asarray(fg))
            self.bg.append(np.asarray(bg))
        log.info("cached %d %s volumes (%.1f MB)", len(self.cases), split,
                 sum(a.nbytes + m.nbytes for a, m in zip(self.images, self.masks)) / 1e6)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        k = int(rng.integers(len(self.cases)))
        shape = self.images[k].shape
        pos = self.pos_fraction if self.fg[k].size else 0.0
        with warnings.catch_warnings():  # a scan without nodules: background centres only, as asked
            warnings.simplefilter("ignore")
            centre = generate_pos_neg_label_crop_centers(
                self.patch, num_samples=1, pos_ratio=pos, label_spatial_shape=shape,
                fg_indices=self.fg[k], bg_indices=self.bg[k],
                rand_state=np.random.RandomState(int(rng.integers(2 ** 31))))[0]
        start = [int(c) - p // 2 for c, p in zip(centre, self.patch)]
        box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        return {
            "image": hu_to_unit(torch.from_numpy(self.images[k][box].copy())[None], self.window),
            "mask": torch.from_numpy(self.masks[k][box].astype(np.float32))[None],
            "coords": coordinate_grid(self.patch, start, shape),
            "case": self.cases[k].id,
        }
