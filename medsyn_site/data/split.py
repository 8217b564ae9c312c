"""Patient-level train/val/test splits (seeded; a patient never spans two splits)."""
from __future__ import annotations

import numpy as np

from medsyn_site.config import SplitConfig


def split_patients(patients: list[str], cfg: SplitConfig) -> dict[str, str]:
    """Map each distinct patient to train, val or test. With >= 3 patients every split gets one."""
    unique = sorted(set(patients))
    order = np.random.default_rng(cfg.seed).permutation(len(unique))
    n = len(unique)
    n_val = int(round(cfg.val * n))
    n_test = n - int(round(cfg.train * n)) - n_val
    if n >= 3:
        n_val = max(n_val, 1) if cfg.val > 0 else 0
        n_test = max(n_test, 1) if cfg.train + cfg.val < 1 else 0
    n_train = n - n_val - n_test
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return {unique[i]: names[k] for k, i in enumerate(order)}
