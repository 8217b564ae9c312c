"""Host memory of the training data per case: the former patch sampler (every volume in memory plus
MONAI's int64 fg/bg index arrays) against the bounded one (nodule indices only;
volumes in memory up to train.cache_gb, the rest memory-mapped from the run dir's cache/).

Measured on phantom cohorts made here: the growth of the process's resident memory (Linux
/proc/self/status: RssAnon, the process's own memory; RssFile, memory-mapped file pages, i.e. the
page cache, which the OS shares and reclaims) while holding each variant's data and cutting 200
patches; then extrapolated per voxel to 500 cases of 256x256x128.

    .venv/bin/python benchmarks/patch_memory.py --shapes 64x64x40 96x96x48 --cases 3 --out benchmarks/patch_memory_cpu.json

"before" is measured as the former code called MONAI (``map_binary_to_indices`` on the (z, y, x) mask)
and as an index of every voxel (the mask with a channel axis, what the issue's estimate assumed).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from monai.transforms.utils import map_binary_to_indices

from _common import in_fresh_process
from medsyn_site.config import PhantomConfig, SplitConfig
from medsyn_site.data.cohort import Cohort
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.diffusion.patches import PatchDataset

MB = 2 ** 20


def rss() -> dict:
    """Resident memory of this process in bytes: {"anon": ..., "file": ...}."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[f"Rss{k.title()}"].split()[0]) * 1024 for k in ("anon", "file")}


def hold(variant: str, root: str, spill: str, q) -> None:
    """In a fresh process: RSS growth while holding one variant's training data (200 patches cut)."""
    cohort = Cohort(root)
    train = [c for c in cohort.cases if c.split == "train"]
    r0 = rss()
    if variant == "before":  # the former PatchDataset: volumes + MONAI's fg/bg indices, as it called it
        kept = []
        for rec in train:
            image, mask = cohort.arrays(rec.id)
            fg, bg = map_binary_to_indices(mask > 0)  # (z, y, x): MONAI took z for channels
            kept.append((image, mask, np.asarray(fg), np.asarray(bg)))
        nbytes = sum(a.nbytes for case in kept for a in case)
    elif variant == "before_per_voxel":  # the same with the channel axis: an index of every voxel
        kept = []
        for rec in train:
            image, mask = cohort.arrays(rec.id)
            fg, bg = map_binary_to_indices(mask[None] > 0)
            kept.append((image, mask, np.asarray(fg), np.asarray(bg)))
        nbytes = sum(a.nbytes for case in kept for a in case)
    else:
        cache = 0 if variant == "after_mmap" else float("inf")
        kept = PatchDataset(cohort, "train", (16, 16, 16), (-1024.0, 2048.0), 0.5, 0).load(cache, spill)
        for i in range(200):
            kept[i]
        nbytes = sum(f.nbytes for f in kept.fg.values()) + sum(
            a.nbytes for vol in kept.volumes.values() for a in vol if not isinstance(a, np.memmap))
    r1 = rss()
    q.put({"bytes_per_case": nbytes / len(train), "rss_anon_mb_per_case": (r1["anon"] - r0["anon"]) / MB / len(train),
           "rss_file_mb_per_case": (r1["file"] - r0["file"]) / MB / len(train)})


VARIANTS = ("before", "before_per_voxel", "after_in_memory", "after_mmap")


def measure(shape_xyz, cases: int, work: Path) -> dict:
    root = work / f"cohort_{'x'.join(map(str, shape_xyz))}_{cases}"
    if not (root / "cohort.json").is_file():
        write_phantom_cohort(PhantomConfig(cases=cases, shape=shape_xyz, seed=1), SplitConfig(train=1.0, val=0.0),
                             root, force=True)
    cohort = Cohort(root)
    train = [c for c in cohort.cases if c.split == "train"]
    voxels = sum(int(np.prod(c.shape)) for c in train)
    spill = work / f"spill_{root.name}"
    PatchDataset(cohort, "train", (16, 16, 16), (-1024.0, 2048.0), 0.5, 0).load(0, spill)  # the spill files, once
    nodule = sum(int(np.count_nonzero(cohort.arrays(c.id)[1])) for c in train)
    out = {"shape_xyz": list(shape_xyz), "train_cases": len(train), "voxels_per_case": voxels / len(train),
           "nodule_share": nodule / voxels}
    for v in VARIANTS:
        out[v] = in_fresh_process(hold, v, str(root), str(spill))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/patch_memory_cpu.json")
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=["64x64x40", "96x96x48"], help="x*y*z sizes to measure")
    ap.add_argument("--work", default=None, help="keep the phantom cohorts here (reused); default: a temp folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [measure(tuple(int(n) for n in s.split("x")), args.cases, work) for s in args.shapes]
    big, n, last = 256 * 256 * 128, 500, rows[-1]
    volume_bytes = 3 * big * n  # int16 image + uint8 mask
    extrap = {  # EXTRAPOLATED per voxel from the largest measured shape (exact array sizes)
        "cases": n, "shape_xyz": [256, 256, 128],
        "before_gb": n * (3 * big + 8 * 256 * 256) / 1e9,  # volumes + an index of every (y, x) column
        "before_per_voxel_gb": n * 11 * big / 1e9,  # volumes + an index of every voxel
        "after_nodule_index_gb": 8 * big * n * last["nodule_share"] / 1e9,
        "after_volumes_in_memory_gb_default_cache_gb_8": min(volume_bytes, 8 * 2 ** 30) / 1e9,
        "after_cache_dir_on_disk_gb": max(0, volume_bytes - 8 * 2 ** 30) / 1e9,
        "note": "nodule share of the phantom cohort",
    }
    result = {"measured": rows, "extrapolated": extrap}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
