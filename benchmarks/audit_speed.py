"""Memorization-audit cost per synthetic volume at 256x256x128 voxels (1.4 x 1.4 x 2.5 mm) against 500
training scans, measured at smaller fields of view and extrapolated (labelled as such).

The phantom is generated at a fraction ``--scales`` of the full field (same voxel size, so the
audit's feature grids keep their mm), and three costs are timed per size: the feature of one volume,
the coarse search per training scan (all flips and shifts), and the fine search (a fixed number of
candidates: rotations, scalings, patch-wise matching). Each is fitted as a power of the number of
voxels over the sizes measured and extrapolated to the full field; the bank size enters linearly
through the ranking (every scan) and the coarse search (the retrieval_keep nearest) only. Training features are cached (computed once per cohort), so they are
not part of the per-volume cost.

    python benchmarks/audit_speed.py --scales 0.3 0.45 0.6 [--out benchmarks/audit_speed_cpu.json]

CPU seconds (time.process_time, one thread)."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from medsyn_site.config import PhantomConfig
from medsyn_site.data.phantom import make_case
from medsyn_site.publish import audit

FULL = (256, 256, 128)
SPACING = (1.4, 1.4, 2.5)


def measure(scale: float, bank_n: int, p: audit.AuditParams) -> dict:
    shape = tuple(max(16, int(round(n * scale))) for n in FULL)
    cfg = PhantomConfig(shape=shape, spacing=SPACING)
    cases = [make_case(cfg, 500 + i) for i in range(bank_n + 1)]
    t = time.process_time()
    feats = [audit.Features.of(c.image, SPACING, p) for c in cases]
    feature_s = (time.process_time() - t) / len(cases)
    bank = audit.Bank([f"t{i}" for i in range(bank_n)], feats[1:], p)
    bank.coarse_spectra(bank.coarse_shape(feats[0].coarse.shape))  # once per audit, not per volume
    t = time.process_time()
    coarse_p = p.model_copy(update={"candidates": 0})  # the coarse search alone
    audit.nearest(feats[0], audit.Bank(bank.ids, bank.feats, coarse_p, bank._spec))
    coarse_s = (time.process_time() - t) / bank_n
    retrieval_p = coarse_p.model_copy(update={"retrieval_keep": 1})  # the 2x coarser ranking + 1 coarse search
    rbank = audit.Bank(bank.ids, bank.feats, retrieval_p, bank._spec)
    rbank.retrieval(audit._halve(feats[0].coarse).shape)  # the bank's spectra: once per audit
    t = time.process_time()
    audit.nearest(feats[0], rbank)
    retrieval_s = max(time.process_time() - t - coarse_s, 0.0) / bank_n
    t = time.process_time()
    audit.nearest(feats[0], bank)
    total_s = time.process_time() - t
    fine_s = max(total_s - coarse_s * bank_n, 0.0)
    return {"scale": scale, "shape_xyz": list(shape), "voxels": int(np.prod(shape)), "bank": bank_n,
            "fine_feature_shape": list(feats[0].fine.shape), "feature_s": feature_s,
            "retrieval_s_per_training_scan": retrieval_s, "coarse_s_per_training_scan": coarse_s, "fine_s": fine_s}


def extrapolate(rows: list[dict], key: str, voxels: float) -> tuple[float, float]:
    """(value at ``voxels``, exponent) of a power law through the two largest sizes measured (small
    sizes carry fixed overheads that would flatten the exponent)."""
    rows = rows[-2:]
    x = np.log([r["voxels"] for r in rows])
    y = np.log([max(r[key], 1e-6) for r in rows])
    k = float(np.polyfit(x, y, 1)[0]) if len(rows) > 1 else 1.0
    return float(np.exp(y[-1] + k * (np.log(voxels) - x[-1]))), k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/audit_speed_cpu.json")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.3, 0.45, 0.6])
    ap.add_argument("--bank", type=int, default=3, help="training scans in the measured bank (>= candidates)")
    ap.add_argument("--train", type=int, default=500, help="training scans to extrapolate to")
    args = ap.parse_args()
    p = audit.AuditParams()
    rows = []
    for s in sorted(args.scales):
        rows.append(measure(s, args.bank, p))
        print(json.dumps(rows[-1]), flush=True)
    full = float(np.prod(FULL))
    keys = ("feature_s", "retrieval_s_per_training_scan", "coarse_s_per_training_scan", "fine_s")
    pred = {k: extrapolate(rows, k, full) for k in keys}
    keep = min(args.train, p.retrieval_keep)  # the bank is ranked at 2x coarse_mm, its nearest searched at coarse_mm
    per_volume = (pred["feature_s"][0] + pred["fine_s"][0] + args.train * pred["retrieval_s_per_training_scan"][0]
                  + keep * pred["coarse_s_per_training_scan"][0])
    result = {"volume_voxels_xyz": list(FULL), "spacing_mm": SPACING, "params": p.__dict__, "measured": rows,
              "extrapolated_to_full": {k: {"seconds": v, "power_of_voxels": e} for k, (v, e) in pred.items()},
              f"EXTRAPOLATED_s_per_volume_{args.train}_train": per_volume}
    print(json.dumps(result, indent=1, default=str))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
