"""The patch sampler's memory is O(nodule voxels) per case, and the same patches come out whether
volumes are kept in memory, memory-mapped from the spill dir, or read from the cohort per patch."""
from __future__ import annotations

import numpy as np
import torch

from medsyn_site.config import ModelConfig
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


def test_typed_mask_channel_is_each_nodules_type_level(phantom_cohort, tmp_path):
    from medsyn_site.imaging import NODULE_CODES, label_nodules

    cohort = Cohort(phantom_cohort)
    binary = _dataset(phantom_cohort)
    levels = ModelConfig(type_levels=(0.2, 0.55, 0.9)).mask_levels()  # model.type_levels, not the defaults
    typed = PatchDataset(cohort, "train", (32, 32, 16), (-1024.0, 2048.0), 0.5, 0, levels=levels)
    for k, rec in enumerate(typed.cases):  # the codes: each recorded nodule's type at its centre, whole
        _, mask = cohort.arrays(rec.id)
        _, codes = typed._read(k)
        labels, _ = label_nodules(mask)
        for n in rec.nodules:
            x, y, z = n.center_voxel
            assert set(np.unique(codes[labels == labels[z, y, x]])) == {NODULE_CODES[n.type]}
    # a spill dir holding the 0/1 masks of an earlier run (named by the mask file) is not mistaken for the codes
    from medsyn_site.diffusion.patches import _spill

    for rec in typed.cases:
        _spill(tmp_path / "cache", rec.sha256["mask"], cohort.arrays(rec.id)[1])
    spilled = PatchDataset(cohort, "train", (32, 32, 16), (-1024.0, 2048.0), 0.5, 0, levels=levels).load(
        cache_bytes=0, spill_dir=tmp_path / "cache")
    assert all(torch.equal(spilled[i]["mask"], typed[i]["mask"]) for i in range(60))
    seen = set()
    for i in range(60):  # the same patches; the channel's level is the type's, where 0/1 says nodule
        a, b = binary[i], typed[i]
        assert (a["image"] == b["image"]).all() and torch.equal(b["mask"] > 0, a["mask"] > 0)
        seen |= {round(float(v), 4) for v in b["mask"].unique()}
    assert seen - {0.0} <= {0.2, 0.55, 0.9} and len(seen - {0.0}) >= 2, seen


def test_type_balanced_centres_reach_rare_nodules_as_often_as_common_ones(tmp_path):
    """Hand-made cohort, 40^3 voxels: case a holds a solid nodule of 7^3 = 343 voxels and a
    ground-glass one of 2^3 = 8; case b a part-solid one of 27 voxels; case c none. Drawn by voxel,
    a nodule-centred patch holds the ground-glass nodule ~8/378 of the time as seen from case a;
    drawn by type, each of the three types centres 1/3 of the nodule patches (exactly: the patch's
    centre voxel is that type's)."""
    import SimpleITK as sitk

    from medsyn_site.data.cohort import CohortWriter
    from medsyn_site.imaging import NODULE_CODES

    boxes = {"a": [("solid", (10, 17)), ("ground-glass", (28, 30))], "b": [("part-solid", (20, 23))], "c": []}
    with CohortWriter(tmp_path / "c") as w:
        for case, nodules in boxes.items():
            mask = np.zeros((40, 40, 40), np.uint8)
            records = []
            for t, (lo, hi) in nodules:
                mask[lo:hi, lo:hi, lo:hi] = 1
                records.append({"type": t, "diameter_mm": float(hi - lo), "center_voxel": ((lo + hi - 1) // 2,) * 3})
            image = np.where(mask > 0, 0, -800).astype(np.int16)
            w.add(case, patient=case, split="train", source="real", image=sitk.GetImageFromArray(image),
                  mask=sitk.GetImageFromArray(mask), nodules=records)

    levels = ModelConfig().mask_levels()  # the level of code 0 (none), 1, 2, 3, 4 (unknown: solid's)

    def centre_codes(sampling: str, n: int = 600) -> np.ndarray:
        data = PatchDataset(Cohort(tmp_path / "c"), "train", (8, 8, 8), (-1024.0, 2048.0), 0.5, 0,
                            levels=levels, pos_sampling=sampling).load()
        centres = []
        for i in range(n):
            p = data[i]["mask"][0]
            centres.append(int(np.abs(np.array(levels[:4]) - float(p[4, 4, 4])).argmin()))  # the level's code
        return np.array(centres)

    typed, voxel = centre_codes("type"), centre_codes("voxel")
    # by type, pos_fraction of all patches are on a nodule; by voxel, of the patches of cases with nodules (2 of 3)
    assert 0.44 < (typed > 0).mean() < 0.56 and 0.28 < (voxel > 0).mean() < 0.39, ((typed > 0).mean(), (voxel > 0).mean())
    share = {t: (typed == NODULE_CODES[t]).sum() / (typed > 0).sum() for t in ("solid", "part-solid", "ground-glass")}
    assert all(0.27 < s < 0.40 for s in share.values()), share
    # by voxel: case a's ground-glass centres are 8 / 351 of case a's (a and b each half of the cases drawn with nodules)
    assert (voxel == NODULE_CODES["ground-glass"]).sum() / (voxel > 0).sum() < 0.06
