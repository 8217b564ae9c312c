"""Host memory of the training data per case: the former patch sampler (every volume in memory plus
an int64 index of every background and nodule voxel) against the bounded one (nodule indices only;
volumes in memory up to train.cache_gb, the rest memory-mapped from the run dir's cache/).

Measured on phantom cohorts made here (numpy bytes held by the dataset, and the process's RSS growth),
then extrapolated per voxel to 500 cases of 256x256x128.

    .venv/bin/python benchmarks/patch_memory.py --out benchmarks/patch_memory_cpu.json
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import numpy as np
from monai.transforms.utils import map_binary_to_indices

from medsyn_site.config import PhantomConfig, SplitConfig
from medsyn_site.data.cohort import Cohort
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.diffusion.patches import PatchDataset


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(shape_xyz, cases: int, tmp: Path) -> dict:
    root = tmp / f"cohort_{'x'.join(map(str, shape_xyz))}"
    write_phantom_cohort(PhantomConfig(cases=cases, shape=shape_xyz, seed=1), SplitConfig(train=1.0, val=0.0), root)
    cohort = Cohort(root)
    train = [c for c in cohort.cases if c.split == "train"]
    # Before: what the former PatchDataset held per case (volumes + MONAI's fg/bg index arrays).
    before = 0
    for rec in train:
        image, mask = cohort.arrays(rec.id)
        fg, bg = map_binary_to_indices(mask > 0)
        before += image.nbytes + mask.nbytes + np.asarray(fg).nbytes + np.asarray(bg).nbytes
    rss0 = rss_mb()
    data = PatchDataset(cohort, "train", (16, 16, 16), (-1024.0, 2048.0), 0.5, 0).load(
        cache_bytes=0, spill_dir=tmp / f"spill_{root.name}")
    for i in range(200):
        data[i]
    after = sum(f.nbytes for f in data.fg.values())
    voxels = sum(int(np.prod(c.shape)) for c in train)
    nodule = sum(f.size for f in data.fg.values())
    return {"shape_xyz": list(shape_xyz), "train_cases": len(train), "voxels": voxels, "nodule_voxels": nodule,
            "before_bytes": before, "after_bytes": after, "before_bytes_per_voxel": before / voxels,
            "nodule_share": nodule / voxels, "rss_growth_mb_after": rss_mb() - rss0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/patch_memory_cpu.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(s, 6, Path(tmp)) for s in ((64, 64, 40), (128, 128, 64))]
    big = 256 * 256 * 128
    per_voxel = max(r["before_bytes_per_voxel"] for r in rows)
    share = max(r["nodule_share"] for r in rows)
    extrap = {"cases": 500, "shape_xyz": [256, 256, 128],
              "before_gb": 500 * big * per_voxel / 1e9,
              "after_index_gb": 500 * big * share * 8 / 1e9}
    Path(args.out).write_text(json.dumps({"measured": rows, "extrapolated": extrap}, indent=1))
    print(json.dumps({"measured": rows, "extrapolated": extrap}, indent=1))


if __name__ == "__main__":
    main()
