"""The utility report's pieces on geometry and numbers set by hand: nodule-level detection, the
low-data curve's data-equivalence, the plain-language conclusion, the low-data arms' names."""
import numpy as np
import pytest

from medsyn_site.evaluate.datasets import EvaluationError, dataset_id, dataset_name, parse_arm
from medsyn_site.evaluate.detection import detect, summarise
from medsyn_site.evaluate.report import conclusion, low_data_curve


def _ball(shape, centre, r):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= r * r


def test_detection_counts_hits_misses_and_false_positives():
    shape = (32, 32, 32)
    gt = np.zeros(shape, np.uint8)
    gt[_ball(shape, (8, 8, 8), 3)] = 1  # found (overlapped by one voxel only)
    gt[_ball(shape, (24, 24, 24), 1)] = 1  # missed
    pred = np.zeros(shape, np.uint8)
    pred[8, 8, 10:14] = 1  # touches the first nodule
    pred[2:4, 28:30, 2:4] = 1  # a false positive
    pred[20, 5, 5] = 1  # another
    nodules = [{"type": "solid", "center_voxel": (8, 8, 8)}, {"type": "ground-glass", "center_voxel": (24, 24, 24)}]
    res = detect(gt, pred, (2.0, 2.0, 2.0), nodules)
    assert [(n["type"], n["found"]) for n in res["nodules"]] == [("solid", True), ("ground-glass", False)]
    assert res["false_positives"] == 2
    # equivalent-sphere diameter: 123 voxels of 8 mm^3 -> (6 * 984 / pi)^(1/3) mm
    assert res["nodules"][0]["diameter_mm"] == pytest.approx((6 * gt[:16].sum() * 8 / np.pi) ** (1 / 3), abs=0.01)
    s = summarise([res, {"nodules": [], "false_positives": 0}])
    assert s["all"] == {"found": 1, "of": 2, "sensitivity": 0.5} and s["fp_per_case"] == 1.0
    assert s["type solid"]["found"] == 1 and s["type ground-glass"]["found"] == 0
    assert s["size >= 10 mm"]["of"] == 1 and s["size < 6 mm"]["of"] == 1  # 14.3 mm and 4.9 mm
    assert detect(gt, np.zeros(shape), (1, 1, 1))["nodules"][0]["type"] == "unknown"


def _row(arm, mean, n=None, p=None, std=0.02, k=3, w=None):
    r = {"arm": arm, "dice_mean": mean, "dice_std": std, "trainings": k, "training_cases": n}
    if p is not None:
        r.update({"p_vs_real": p, "wilcoxon_p_vs_real": w if w is not None else p})
    return r


def test_low_data_curve_worth_in_real_cases():
    rows = [_row("real", 0.5, n=16), _row("real+synthetic", 0.52, n=32, p=0.4),
            _row("real@4", 0.2, n=4), _row("real+synthetic@4", 0.3, n=20, p=0.01),
            _row("real@8", 0.4, n=8), _row("real+synthetic@8", 0.6, n=24, p=0.01)]
    curve = {c["n"]: c for c in low_data_curve(rows)}
    assert sorted(curve) == [4, 8, 16]
    # 0.3 lies halfway (in log N) between 4 (0.2) and 8 (0.4): worth sqrt(32) real cases
    assert curve[4]["worth_real_cases"] == f"{np.sqrt(32):.1f}"
    assert curve[8]["worth_real_cases"] == "> 16"  # above the whole real-only curve
    assert curve[16]["real_dice"] == 0.5 and curve[16]["synthetic_dice"] == 0.52  # the full sets
    assert low_data_curve([_row("real", 0.5, n=16)]) == []


def test_conclusion_says_what_the_tests_support():
    nan = float("nan")
    text = conclusion([_row("real", 0.50), _row("synthetic", 0.40, p=0.01, w=0.02), _row("real+synthetic", 0.51, p=0.6),
                       _row("real+targeted", 0.55, p=nan, k=1, w=0.03), _row("real+synthetic@4", 0.9, p=0.001)])
    assert "synthetic data lowered the test Dice by 0.100" in text and "Welch p = 0.010" in text
    assert "real+synthetic data did not change the test Dice detectably (+0.010" in text
    # one training per arm: the paired per-case test decides, and the sentence says what it leaves out
    assert "real+targeted data raised the test Dice by 0.050" in text and "One training per arm" in text
    assert "0.9" not in text  # the low-data arms are the curve's, not the conclusion's
    assert "too few trainings and cases" in conclusion([_row("real", 0.5), _row("synthetic", 0.4, p=nan, w=nan)])
    assert conclusion([_row("real", 0.5)]).startswith("Nothing to compare yet")


def test_low_data_arm_names():
    assert parse_arm("real+synthetic@8") == ("real+synthetic", 8) and parse_arm("real") == ("real", None)
    ids = {dataset_id(a) for a in ("real", "synthetic", "real+synthetic", "real+targeted", "real@1", "real+synthetic@1",
                                   "real@2", "real+synthetic@2", "real@121")}
    assert len(ids) == 9 and max(ids) <= 999
    assert dataset_name("real+synthetic@8") == f"Dataset{dataset_id('real+synthetic@8')}_medsyn_real_synthetic_n8"
    for bad in ("synthetic@4", "real@0", "real@x", "fake", "real@122"):
        with pytest.raises(EvaluationError):
            dataset_id(bad)
