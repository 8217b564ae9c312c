"""Memorization-audit cost per synthetic volume at 256x256x128 voxels (1.4 x 1.4 x 2.5 mm) against a
training bank, measured on small banks and extrapolated linearly in the bank size (the coarse search
is per training scan; the fine search runs on a fixed number of candidates).

    python benchmarks/audit_speed.py [--out benchmarks/audit_speed_cpu.json]

CPU seconds (time.process_time, one thread)."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import ndimage

from medsyn_site.config import PhantomConfig
from medsyn_site.data.phantom import make_case
from medsyn_site.publish import audit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/audit_speed_cpu.json")
    ap.add_argument("--banks", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    # the physical field of a 256x256x128 CT at 1.4x1.4x2.5 mm, generated at half resolution
    cfg = PhantomConfig(shape=(128, 128, 64), spacing=(2.8, 2.8, 5.0))
    spacing = (1.4, 1.4, 2.5)
    p = audit.AuditParams()
    cases = [make_case(cfg, 500 + i) for i in range(max(args.banks) + 1)]
    full = [ndimage.zoom(c.image.astype(np.float32), 2, order=1) for c in cases]  # 128 x 256 x 256
    t = time.process_time()
    feats = [audit.Features.of(hu, spacing, p) for hu in full]
    feature_s = (time.process_time() - t) / len(full)
    rows = []
    for n in args.banks:
        bank = audit.Bank([f"t{i}" for i in range(n)], feats[1:n + 1], p)
        bank.coarse_spectra(bank.coarse_shape(feats[0].coarse.shape))  # once per audit, not per volume
        t = time.process_time()
        audit.nearest(feats[0], bank)
        rows.append({"bank": n, "search_s": time.process_time() - t})
    slope = (rows[-1]["search_s"] - rows[0]["search_s"]) / (rows[-1]["bank"] - rows[0]["bank"])
    fixed = rows[0]["search_s"] - slope * rows[0]["bank"]
    result = {"volume_voxels_xyz": [256, 256, 128], "spacing_mm": spacing, "params": p.__dict__,
              "coarse_feature_shape": list(feats[0].coarse.shape), "fine_feature_shape": list(feats[0].fine.shape),
              "feature_s": feature_s, "measured": rows, "per_training_scan_s": slope, "fixed_s": fixed,
              "predicted_s_per_volume_500_train": feature_s + fixed + 500 * slope}
    print(json.dumps(result, indent=1, default=str))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
