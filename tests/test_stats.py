"""The evaluator's statistics, checked against the paper's own numbers."""
import math

import numpy as np
import pytest

from medsyn_site.evaluate.stats import (bootstrap_ci, compare_from_summary, compare_means, dice,
                                        paired_wilcoxon, stratum)


def test_reproduces_the_papers_p_value():
    """arXiv 2410.12542, Table 1: real 0.4913 +- 0.02733 vs real + synthetic 0.5418 +- 0.03015, 5 each."""
    assert compare_from_summary(0.4913, 0.02733, 5, 0.5418, 0.03015, 5) == pytest.approx(0.024335, abs=5e-6)
    # and the function that runs on K training means agrees with the summary form
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.49, 0.03, 5), rng.normal(0.54, 0.03, 5)
    assert compare_means(a, b) == pytest.approx(
        compare_from_summary(a.mean(), a.std(ddof=1), 5, b.mean(), b.std(ddof=1), 5), rel=1e-9)


def test_dice_and_empty_cases():
    assert dice(10, 0, 0) == 1.0 and dice(0, 5, 0) == 0.0 and dice(0, 0, 0) == 1.0
    assert dice(3, 1, 2) == pytest.approx(6 / 9)


def test_paired_and_bootstrap():
    real = [0.2, 0.4, 0.5, 0.6, 0.3, 0.1, 0.7, 0.2]
    better = [r + 0.1 + 0.01 * i for i, r in enumerate(real)]
    assert paired_wilcoxon(real, better) < 0.01 and paired_wilcoxon(real, real) == 1.0
    lo, hi = bootstrap_ci(np.array(better) - np.array(real))
    assert 0.1 < lo < hi < 0.2
    assert math.isnan(compare_means([0.5], [0.6]))


def test_size_strata():
    assert [stratum(d) for d in (0, 3.5, 6, 9.9, 10, 25)] == ["no nodule", "< 6 mm", "6-10 mm", "6-10 mm",
                                                            ">= 10 mm", ">= 10 mm"]
