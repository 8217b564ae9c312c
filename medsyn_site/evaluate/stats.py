"""Statistics of the utility test: per-case Dice, the paper's test over the K training means,
a paired per-case Wilcoxon test, bootstrap confidence intervals, Dice by nodule size."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

EMPTY_RULE = ("Dice = 2TP / (2TP + FP + FN). A case with an empty ground truth and an empty prediction "
              "counts as Dice 1 (a correct 'no nodule'); an empty ground truth with any predicted voxel "
              "counts as 0. nnU-Net's own summary drops empty/empty cases as NaN; its mean is reported "
              "beside ours.")
SIZE_STRATA = ((0.0, 0.0, "no nodule"), (0.0, 6.0, "< 6 mm"), (6.0, 10.0, "6-10 mm"), (10.0, math.inf, ">= 10 mm"))


def dice(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def compare_means(real_means, arm_means) -> float:
    """p-value of the arm against real over the K per-training mean Dice values: Welch's two-sample
    t-test (it reproduces the paper's p = 0.0243 from its Table 1)."""
    a, b = np.asarray(real_means, float), np.asarray(arm_means, float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare_from_summary(mean_a, std_a, n_a, mean_b, std_b, n_b) -> float:
    """The same test from means and standard deviations (as a paper's table gives them)."""
    return float(stats.ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False).pvalue)


def paired_wilcoxon(real_cases, arm_cases) -> float:
    """Wilcoxon signed-rank over cases (each case's Dice averaged over the K trainings)."""
    d = np.asarray(arm_cases, float) - np.asarray(real_cases, float)
    if len(d) < 2 or np.allclose(d, 0):
        return 1.0 if len(d) else float("nan")
    return float(stats.wilcoxon(d).pvalue)


def bootstrap_ci(values, n: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (scipy.stats.bootstrap)."""
    v = np.asarray(values, float)
    if len(v) < 2 or np.allclose(v, v[0]):
        return (float(v.mean()), float(v.mean())) if len(v) else (float("nan"), float("nan"))
    res = stats.bootstrap((v,), np.mean, n_resamples=n, confidence_level=level, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def stratum(diameter_mm: float) -> str:
    for lo, hi, name in SIZE_STRATA:
        if (diameter_mm == 0 and hi == 0) or (lo <= diameter_mm < hi and hi > 0 and diameter_mm > 0):
            return name
    return SIZE_STRATA[-1][2]
