"""The patch sampler's memory is O(nodule voxels) per case, and the same patches come out whether
volumes are kept in memory, memory-mapped from the spill dir, or read from the cohort per patch."""
from __future__ import annotations

import numpy as np

from medsyn_site.data.cohort import Cohort
from medsyn_site.diffusion.patches import PatchDataset


def _dataset(cohort):
    return PatchDataset(Cohort(cohort), "train", (32, 32, 16), (-1024.0, 2048.0), 0.5, 0)


def test_same_patches_in_memory_spilled_and_from_disk(phantom_cohort, tmp_path):
    memory = _dataset(phantom_cohort).load()
    spilled = _dataset(phantom_cohort).load(cache_bytes=0, spill_dir=tmp_path / "cache")
    lazy = _dataset(phantom_cohort)  # no load(): each case read from its NIfTI when drawn
    assert all(isinstance(v[0], np.memmap) for v in spilled.volumes.values())
    nodule_patches = 0
    for i in range(60):
        a, b, c = memory[i], spilled[i], lazy[i]
        for k in ("image", "mask", "coords"):
            assert (a[k] == b[k]).all() and (a[k] == c[k]).all(), (i, k)
        nodule_patches += int(a["mask"].sum() > 0)
    assert 10 < nodule_patches < 60  # both kinds of centre occur


def test_memory_per_case_is_nodule_voxels(phantom_cohort, tmp_path):
    data = _dataset(phantom_cohort).load(cache_bytes=0, spill_dir=tmp_path / "cache")
    cohort = Cohort(phantom_cohort)
    for k, rec in enumerate(data.cases):
        _, mask = cohort.arrays(rec.id)
        assert data.fg[k].nbytes == 8 * int((mask > 0).sum())  # int64 per nodule voxel, nothing per volume voxel
        assert np.array_equal(data.fg[k], np.flatnonzero(mask))
    assert not hasattr(data, "bg")


def test_background_centres_avoid_nodules_uniformly():
    from medsyn_site.diffusion.patches import _background_voxel

    fg = np.arange(0, 900)  # 90% of a 1000-voxel volume is nodule
    rng = np.random.default_rng(0)
    draws = np.array([_background_voxel(rng, fg, 1000) for _ in range(5000)])
    assert draws.min() >= 900 and draws.max() <= 999
    counts = np.bincount(draws - 900, minlength=100)
    assert counts.min() > 20 and counts.max() < 85  # ~50 each: uniform over the background
