"""Is the phantom a real segmentation task? (a benchmark, not a test)

nnU-Net v2 (real-only arm, through `medsyn evaluate`) trained on a phantom cohort; reports the test
Dice, and sorts every false-positive component of the predictions by what it sits on: a vessel
(dense lung voxels outside the mask), the pleura (touching the lung boundary) or elsewhere.

  python benchmarks/phantom_difficulty.py --cases 20 --epochs 30 --iterations 16 \
      --out benchmarks/phantom_difficulty.json
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medsyn_site.config import PhantomConfig, SplitConfig
from medsyn_site.data.cohort import Cohort
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.imaging import label_nodules, lung_mask
from medsyn_site.evaluate.stats import dice


def classify_false_positives(hu: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> dict:
    lungs = lung_mask(hu)
    boundary = lungs & ~ndimage.binary_erosion(lungs, iterations=2)
    vessels = (hu > -500) & ndimage.binary_dilation(lungs, iterations=2) & (gt == 0)
    labels, n = label_nodules(pred)
    out = {"vessel": 0, "pleura": 0, "other": 0}
    for i in range(1, n + 1):
        comp = labels == i
        if (comp & (gt > 0)).any():
            continue
        if (comp & boundary).any():
            out["pleura"] += 1
        elif (comp & vessels).sum() >= 0.5 * comp.sum():
            out["vessel"] += 1
        else:
            out["other"] += 1
    return out


def detected_nodules(gt: np.ndarray, pred: np.ndarray, nodules) -> list[dict]:
    """Per listed nodule (type, size, attachment): did the prediction touch its mask component?"""
    labels, _ = label_nodules(gt)
    out = []
    for n in nodules:
        x, y, z = n.center_voxel
        comp = labels[z, y, x]
        out.append({"type": n.type, "diameter_mm": n.diameter_mm, "attachment": n.attachment,
                    "detected": bool(comp and (pred[labels == comp] > 0).any())})
    return out


def summarise_detection(rows: list[dict]) -> dict:
    groups = {}
    for r in rows:
        size = "<6 mm" if r["diameter_mm"] < 6 else "6-10 mm" if r["diameter_mm"] < 10 else ">=10 mm"
        for key in (f"type={r['type']}", f"size={size}", f"attachment={r['attachment']}"):
            groups.setdefault(key, []).append(r["detected"])
    return {k: f"{sum(v)}/{len(v)}" for k, v in sorted(groups.items())}


def false_positive_figure(rows, out: Path) -> None:
    """Per test case, the axial slice with the most false-positive voxels (else the most nodule
    voxels): mask green, prediction red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medsyn_site.data.show import LUNG_WINDOW

    fig, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 3.2), squeeze=False)
    for ax, (case, hu, gt, pred) in zip(axes[0], rows):
        fp = ((pred > 0) & (gt == 0)).sum((1, 2))
        z = int(np.argmax(fp if fp.any() else gt.sum((1, 2))))
        ax.imshow(hu[z], cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1])
        for m, colour in ((gt, "lime"), (pred, "red")):
            if m[z].any():
                ax.contour(m[z] > 0, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"{case} z={z}: nodule green, nnU-Net red", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--configuration", default="2d")
    ap.add_argument("--work", default="/tmp/medsyn-phantom-difficulty", help="must not exist yet")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    cohort_dir, ws = work / "phantom", work / "ws"
    if not cohort_dir.exists():
        write_phantom_cohort(PhantomConfig(cases=args.cases, seed=7, shape=tuple(args.shape)), SplitConfig(),
                             cohort_dir)
    medsyn = [sys.executable, "-m", "medsyn_site.cli", "evaluate"]
    run = ws / "runs" / "real" / "seed0"
    if not (run / "result.json").exists():  # else: analyse the finished training again
        subprocess.run(medsyn + ["prepare", "--ws", str(ws), "--real", str(cohort_dir), "--configuration",
                                 args.configuration, "--seeds", "1"], check=True)
        subprocess.run(medsyn + ["train", "--ws", str(ws), "--arm", "real", "--seed", "0", "--epochs",
                                 str(args.epochs), "--iterations", str(args.iterations), "--force"], check=True)
    result = json.loads((run / "result.json").read_text())
    log = "".join(f.read_text() for f in sorted(run.rglob("training_log*.txt")))  # + resumed runs' logs
    curve = [float(v) for v in re.findall(r"Pseudo dice \[np\.float32\(([0-9.e-]+)\)\]", log)]
    if args.out:  # nnU-Net's own learning-curve figure (losses, pseudo Dice, epoch times)
        shutil.copyfile(next(run.rglob("progress.png")), Path(args.out).with_suffix(".png"))
    cohort = Cohort(cohort_dir)
    per_case, fps, found, shown = {}, {"vessel": 0, "pleura": 0, "other": 0}, [], []
    for case, m in result["test"].items():
        hu, gt = cohort.arrays(case)
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(result["pred_test"]) / f"{case}.nii.gz")))
        per_case[case] = dice(m["TP"], m["FP"], m["FN"])
        for k, v in classify_false_positives(hu, gt, pred).items():
            fps[k] += v
        found += detected_nodules(gt, pred, cohort.case(case).nodules)
        shown.append((case, hu, gt, pred))
    summary = {"cases": args.cases, "shape": args.shape, "configuration": args.configuration,
               "epochs": args.epochs, "iterations": args.iterations, "seconds": result["seconds"],
               "test_dice_mean": float(np.mean(list(per_case.values()))), "test_dice": per_case,
               "false_positive_components": fps, "test_nodules_detected": summarise_detection(found),
               "val_pseudo_dice_per_epoch": curve}
    print(json.dumps(summary, indent=1))
    if args.out:
        false_positive_figure(shown, Path(args.out).with_name(Path(args.out).stem + "_fp.png"))
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
