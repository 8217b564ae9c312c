"""The shared imaging helpers against geometry set by hand: one nodule count for one mask (26-connected
components), equivalent-sphere diameters in mm with anisotropic voxels, the body and lung masks."""
from __future__ import annotations

import numpy as np
import pytest

from medsyn_site.imaging import (NODULE_CODES, body_mask, diameter_mm, diameters_mm, label_nodules, lung_mask,
                                 nodule_codes, nodule_records)


def test_diagonal_neighbours_are_one_nodule():
    m = np.zeros((5, 5, 5), np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = 1  # corner-touching: one nodule at 26-connectivity (two at 6)
    m[4, 4, 4] = 1
    assert label_nodules(m)[1] == 2


def test_diameters_of_a_ball_and_a_box_in_mm():
    z, y, x = np.mgrid[:40, :40, :40]
    ball = ((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2) <= 10 ** 2  # radius 10 voxels
    box = np.zeros((40, 40, 40), bool)
    box[2:6, 30:38, 30:39] = True  # 4 x 8 x 9 = 288 voxels
    labels, n = label_nodules(ball | box)
    assert n == 2
    d = diameters_mm(labels, (2.0, 1.0, 1.0))  # 2 mm slices: each voxel is 2 mm3
    volumes = sorted([ball.sum() * 2.0, 288 * 2.0])
    expect = sorted((6 * v / np.pi) ** (1 / 3) for v in volumes)
    assert sorted(d) == pytest.approx(expect, rel=1e-9)
    assert diameter_mm(ball, (1.0, 1.0, 1.0)) == pytest.approx(20.0, rel=0.02)  # the ball's own diameter
    assert diameter_mm(np.zeros((3, 3, 3)), (1, 1, 1)) == 0.0


def test_body_and_lungs_of_a_drawn_chest():
    hu = np.full((4, 40, 40), -1000.0)  # air outside
    yy, xx = np.mgrid[:40, :40]
    body = (yy - 20) ** 2 / 16 ** 2 + (xx - 20) ** 2 / 18 ** 2 <= 1
    lungs = ((yy - 20) ** 2 + (xx - 12) ** 2 <= 25) | ((yy - 20) ** 2 + (xx - 28) ** 2 <= 25)
    hu[:, body] = 40.0
    hu[:, lungs] = -850.0
    hu[0, 2, 2] = 300.0  # a speck outside the body: not the largest component
    assert (body_mask(hu) == np.broadcast_to(body, hu.shape)).all()  # lungs filled in, speck dropped
    assert (lung_mask(hu) == np.broadcast_to(lungs, hu.shape)).all()  # outside air is not lung


def test_nodule_types_by_record_centre_and_back():
    m = np.zeros((20, 20, 20), np.uint8)
    m[2:5, 2:5, 2:5] = 1          # a box: ground-glass, its record's centre inside
    m[10:13, 2:5, 2:5] = 1        # no record names it: unknown
    m[2:8, 12:18, 12:14] = 1      # a C shape (its centroid is outside it): part-solid, centre on the arm
    m[4:6, 14:16, 12:14] = 0
    m[4:6, 16:18, 12:14] = 0
    nodules = [{"type": "ground-glass", "center_voxel": (3, 3, 3)},        # x, y, z
               {"type": "part-solid", "center_voxel": (12, 13, 2)},
               {"type": "solid", "center_voxel": (19, 19, 19)},          # on no nodule: ignored
               {"type": "solid", "center_voxel": (40, 3, 3)}]            # outside the volume: ignored
    codes = nodule_codes(m, nodules)
    assert codes.dtype == np.uint8 and np.array_equal(codes > 0, m > 0)
    assert set(np.unique(codes[2:5, 2:5, 2:5])) == {NODULE_CODES["ground-glass"]}
    assert set(np.unique(codes[10:13, 2:5, 2:5])) == {NODULE_CODES["unknown"]}
    assert set(np.unique(codes[2:8, 12:18, 12:14][m[2:8, 12:18, 12:14] > 0])) == {NODULE_CODES["part-solid"]}
    recs = nodule_records(codes, (2.0, 1.0, 1.0))
    assert sorted(r["type"] for r in recs) == ["ground-glass", "part-solid", "unknown"]
    for r in recs:  # every centre lies on its own nodule, so the records type the mask back the same
        x, y, z = r["center_voxel"]
        assert m[z, y, x]
    assert np.array_equal(nodule_codes(m, recs), codes)
    assert sorted(r["diameter_mm"] for r in recs) == pytest.approx(
        sorted(diameters_mm(label_nodules(m)[0], (2.0, 1.0, 1.0))), abs=0.01)
