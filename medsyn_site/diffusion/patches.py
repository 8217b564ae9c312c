"""Training patches: random 3-D crops of CT + mask + the matching crop of the whole-volume
coordinate grid, biased towards nodules.

Sample ``i`` is a pure function of (seed, i): which case, which crop centre (MONAI's
pos/neg crop-centre generator), so a resumed run sees exactly the data an uninterrupted one would,
and DataLoader workers need no shared random state.

Memory per case is O(nodule voxels): the sorted flat indices of its nodule voxels; a background
centre is a uniformly drawn voxel (redrawn when it falls on a nodule), not an index of every
background voxel. Volumes are kept in memory up to ``cache_bytes``; the rest are read per patch from
uncompressed, memory-mapped copies in ``spill_dir`` (the OS page cache decides what stays in RAM,
shared by all processes), or from the cohort's files when there is no spill dir.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.transforms.utils import generate_pos_neg_label_crop_centers
from torch.utils.data import Dataset

from medsyn_site.data.cohort import Cohort
from medsyn_site.diffusion.model import coordinate_grid, hu_to_unit, mask_channel
from medsyn_site.errors import MedsynError
from medsyn_site.imaging import nodule_codes

log = logging.getLogger(__name__)


class PatchError(MedsynError):
    """A patch cannot be cut from the cohort (e.g. the patch is larger than a volume)."""


class PatchDataset(Dataset):
    """``dataset[i]`` -> dict(image (1,z,y,x) in [-1,1], mask (1,z,y,x), coords (3,z,y,x), case).
    ``levels``: the mask channel carries each nodule's type level (``ModelConfig.mask_levels()``, types
    from cohort.json's records); None: 0/1.

    Construction only validates (cohort.json shapes); ``load()`` reads every case once (nodule
    indices, the memory cache, the spill files). Without it, cases are read on first use."""

    def __init__(self, cohort: Cohort, split: str, patch_xyz, window, pos_fraction: float,
                 seed: int, length: int = 2 ** 62, levels: tuple[float, ...] | None = None, pos_sampling: str = "voxel"):
        self.patch = tuple(int(p) for p in patch_xyz[::-1])  # z, y, x
        self.window, self.pos_fraction, self.seed, self.length = window, pos_fraction, seed, length
        self.levels, self.pos_sampling = levels, pos_sampling
        self.cohort = cohort
        self.cases = [c for c in cohort.cases if c.split == split]
        if not self.cases:
            raise PatchError(f"{cohort.root}: no cases in the {split!r} split to train on")
        small = [c.id for c in self.cases if any(p > s for p, s in zip(self.patch, c.shape[::-1]))]
        if small:
            raise PatchError(f"{cohort.root}: patch {tuple(patch_xyz)} (x, y, z) is larger than the "
                             f"volume of case(s) {', '.join(small[:5])} (shape {self.cases[0].shape})")
        self.fg: dict[int, np.ndarray] = {}  # case -> sorted flat indices of its nodule voxels
        self.fg_codes: dict[int, np.ndarray] = {}  # case -> the type code of each of those voxels
        self.type_cases: dict[int, list[int]] | None = None  # type code -> cases holding it (pos_sampling "type")
        self.volumes: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # in memory or memory-mapped

    def load(self, cache_bytes: float = float("inf"), spill_dir: str | Path | None = None) -> "PatchDataset":
        """Read every case once: nodule indices; the volumes into memory while they fit in
        ``cache_bytes``, the rest into ``spill_dir`` (uncompressed .npy, reused when present)."""
        from tqdm import tqdm

        kept = spilled = 0
        for k, rec in enumerate(tqdm(self.cases, desc="read cases", unit="case", leave=False)):
            image, codes = self._read(k)
            self._index(k, codes)
            if kept + image.nbytes + codes.nbytes <= cache_bytes:
                self.volumes[k] = (image, codes)
                kept += image.nbytes + codes.nbytes
            elif spill_dir is not None:
                # the codes' file is named by the mask file and the nodule records together
                codes_key = hashlib.sha256(f"{rec.sha256['mask']}|{[n.model_dump_json() for n in rec.nodules]}".encode())
                self.volumes[k] = (_spill(Path(spill_dir), rec.sha256["image"], image),
                                   _spill(Path(spill_dir), "codes" + codes_key.hexdigest(), codes))
                spilled += 1
        log.info("%s: %d cases, %.1f MB in memory, %d memory-mapped from %s, %d read per patch; "
                 "nodule indices %.1f MB", self.cases[0].split, len(self.cases), kept / 1e6, spilled, spill_dir,
                 len(self.cases) - len(self.volumes), sum(f.nbytes for f in self.fg.values()) / 1e6)
        return self

    def _index(self, k: int, codes: np.ndarray) -> None:
        self.fg[k] = np.flatnonzero(codes)
        self.fg_codes[k] = codes.reshape(-1)[self.fg[k]]

    def _read(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A case's image and nodule codes (imaging.NODULE_CODES per voxel)."""
        rec = self.cases[k]
        image, mask = self.cohort.arrays(rec.id)
        return image, nodule_codes(mask, rec.nodules)

    def _case(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if k in self.volumes:
            image, codes = self.volumes[k]
        else:  # not loaded, or over the budget without a spill dir: read from the cohort
            image, codes = self._read(k)
        if k not in self.fg:
            self._index(k, codes)
        return image, codes, self.fg[k]

    def _type_centre(self, rng: np.random.Generator) -> tuple[int, np.ndarray] | None:
        """pos_sampling "type": a nodule type uniformly among those of the split, a case holding it
        uniformly, then one of that type's voxels: rare types (ground-glass) are centred as often as
        common ones (solid), whatever their voxel counts. None when the split has no nodules."""
        if self.type_cases is None:  # every case's types (load() has indexed them; else read here once)
            for k in range(len(self.cases)):
                self._case(k)
            self.type_cases = {}
            for k in range(len(self.cases)):
                for c in np.unique(self.fg_codes[k]).tolist():
                    self.type_cases.setdefault(c, []).append(k)
        if not self.type_cases:
            return None
        codes = sorted(self.type_cases)
        code = codes[int(rng.integers(len(codes)))]
        k = self.type_cases[code][int(rng.integers(len(self.type_cases[code])))]
        return k, self.fg[k][self.fg_codes[k] == code]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        k = int(rng.integers(len(self.cases)))
        typed = None
        if self.pos_sampling == "type":  # decide here whether the patch is nodule-centred, then where
            typed = self._type_centre(rng) if rng.random() < self.pos_fraction else None
            k = typed[0] if typed else k
        image, mask, fg = self._case(k)
        shape = image.shape
        pos = self.pos_fraction if fg.size else 0.0
        if self.pos_sampling == "type":
            fg, pos = (typed[1], 1.0) if typed else (fg, 0.0)
        # One uniformly drawn background voxel stands for the index of all of them (MONAI then
        # picks fg or bg by pos_ratio and moves the centre inside the volume).
        bg = [_background_voxel(rng, fg, int(np.prod(shape)))]
        with warnings.catch_warnings():  # a scan without nodules: background centres only, as asked
            warnings.simplefilter("ignore")
            centre = generate_pos_neg_label_crop_centers(
                self.patch, num_samples=1, pos_ratio=pos, label_spatial_shape=shape,
                fg_indices=fg, bg_indices=bg, rand_state=np.random.RandomState(int(rng.integers(2 ** 31))))[0]
        start = [int(c) - p // 2 for c, p in zip(centre, self.patch)]
        box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        return {
            "image": hu_to_unit(torch.from_numpy(np.array(image[box]))[None], self.window),
            "mask": mask_channel(mask[box], self.levels)[None],
            "coords": coordinate_grid(self.patch, start, shape),
            "case": self.cases[k].id,
        }


def _background_voxel(rng: np.random.Generator, fg: np.ndarray, size: int) -> int:
    """A uniformly random flat index not in the sorted ``fg`` (rejection: nodules are a tiny share)."""
    if fg.size >= size:
        return 0  # all nodule: MONAI is told pos_ratio 1 in effect (fg.size > 0); the value is unused
    while True:
        i = int(rng.integers(size))
        j = np.searchsorted(fg, i)
        if j == fg.size or fg[j] != i:
            return i


def _spill(folder: Path, sha256: str, arr: np.ndarray) -> np.ndarray:
    """An uncompressed copy of ``arr`` named by its source file's sha256 (reused across runs and
    processes; written aside and renamed), opened memory-mapped."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sha256[:32]}.npy"
    if not path.exists():
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")
