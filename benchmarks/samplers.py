"""Few-step samplers against DDPM-1000 on the same weights (the shipped phantom model): the table and
picture of benchmarks/RESULTS.md "Samplers".

The samples and the realism measures come from benchmarks/realism.py (each sampler a `--model
LABEL=WEIGHTS@SAMPLER:STEPS`, 4 volumes from the relocated masks of the 6 held-out phantom scans);
this adds the quality benchmark's measures (tissue fractions by HU, HU distance, body and lung Dice
with the best-matching real scan, nodule contrast) from the kept samples, and the picture.

  W=medsyn_site/pretrained/phantom-tiny.pt
  python benchmarks/realism.py --out benchmarks/out/realism --samples 4 \\
      --model s-dpm++10=$W@dpm++:10 --model s-sde-dpm++10=$W@sde-dpm++:10 --model s-dpm++5=$W@dpm++:5 \\
      --model s-dpm++8=$W@dpm++:8 --model s-ddim10=$W@ddim:10 --model s-ddpm50=$W@ddpm:50 \\
      --model s-ddpm1000=$W@ddpm:1000
  python benchmarks/samplers.py --out benchmarks/out/realism
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medsyn_site import quality, realism  # noqa: E402
from medsyn_site.data.show import LUNG_WINDOW  # noqa: E402
from medsyn_site.imaging import body_mask, lung_region  # noqa: E402


def shape_and_tissue(vols: list, real: list) -> dict:
    pooled = np.concatenate([v.hu.ravel() for v in real]).astype(np.float32)
    bodies = [body_mask(v.hu) for v in real]
    lungs = [lung_region(v.hu, b) for v, b in zip(real, bodies)]
    rows = []
    for v in vols:
        hu = v.hu.astype(np.float32)
        body = body_mask(hu)
        lung = lung_region(hu, body)
        c = [n.contrast for n in quality.nodule_contrasts(hu, v.mask)]
        rows.append({"tissue": quality.tissue_fractions(hu), "hu_w1": quality.hu_distance(hu, pooled),
                     "body": max(quality.dice(body, b) for b in bodies if b.shape == body.shape),
                     "lung": max(quality.dice(lung, m) for m in lungs if m.shape == lung.shape), "contrast": c})
    return {"tissue": {k: float(np.mean([r["tissue"][k] for r in rows])) for k in rows[0]["tissue"]},
            "hu_w1": float(np.mean([r["hu_w1"] for r in rows])), "body": float(np.mean([r["body"] for r in rows])),
            "lung": float(np.mean([r["lung"] for r in rows])),
            "contrast": float(np.mean([c for r in rows for c in r["contrast"]] or [np.nan]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/realism")
    ap.add_argument("--prefix", default="s-", help="the labels of the sampler runs in realism.py's results")
    ap.add_argument("--figure", default="benchmarks/samplers.png")
    ap.add_argument("--time", action="store_true",
                    help="time one volume per sampler on this (idle) machine, 2 threads; DDPM-1000 as 20x DDPM-50")
    a = ap.parse_args()
    out = Path(a.out)
    results = json.loads((out / "results.json").read_text())
    made = json.loads((out / "models.json").read_text())
    real = realism.cohort_volumes(out / "heldout")
    types = realism.nodule_types(real)
    labels = sorted((k for k in results if k.startswith(a.prefix) and (out / "samples" / f"{k}.npz").exists()),
                    key=lambda k: int(made[k]["sampler"].split(":")[1]), reverse=True)
    sets = {}
    for k in labels:
        d = np.load(out / "samples" / f"{k}.npz")
        sets[k] = [realism.Volume(h, m, real[0].spacing, types) for h, m in zip(d["hu"], d["mask"])]
    timing_file = out / "samplers_timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if a.time:
        import sys
        import torch

        sys.path.insert(0, str(Path(__file__).parent))
        import quality as quality_bench

        torch.set_num_threads(2)
        for k in labels:
            how = made[k]["sampler"]
            if how.endswith(":1000") or k in timing:
                continue
            sampler, steps = how.split(":")
            quality_bench.sample(Path(made[k]["weights"]), out / "heldout", 1, sampler, int(steps))  # warm-up
            timing[k] = round(quality_bench.sample(Path(made[k]["weights"]), out / "heldout", 1, sampler, int(steps))[1], 2)
            print(k, timing[k], "s/volume", flush=True)
        timing_file.write_text(json.dumps(timing, indent=1))
    for k in labels:
        if made[k]["sampler"].endswith(":1000") and "s-ddpm50" in timing:
            timing[k] = round(20 * timing["s-ddpm50"], 1)
    rows = {"real (held out)": shape_and_tissue(real[len(real) // 2:], real[: len(real) // 2])}
    rows |= {k: shape_and_tissue(v, real) for k, v in sets.items()}
    head = ("| sampler | network evaluations | s/volume (CPU, idle) | air / lung / soft / bone | HU W1 | body / lung Dice | "
            "nodule contrast HU | CNN C2ST | feature C2ST | HU W1 lung / wall | lung HF power | vessels | MS-SSIM |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for k, q in rows.items():
        t = q["tissue"]
        m = results.get(k) or results["real-vs-real"]
        how = made[k]["sampler"] if k in made else "-"
        lines.append(
            f"| {k} | {how.split(':')[1] if ':' in how else '-'} | {timing.get(k, '-')} | "
            f"{t['air']:.3f} / {t['lung']:.3f} / {t['soft']:.3f} / {t['bone']:.3f} | {q['hu_w1']:.0f} | "
            f"{q['body']:.3f} / {q['lung']:.3f} | {q['contrast']:.0f} | {m['cnn_c2st']['accuracy']:.3f} | "
            f"{m['feature_c2st']['accuracy']:.3f} | {m['hu_w1']['lung']:.0f} / {m['hu_w1']['wall']:.0f} | "
            f"{m['lung_high_frequency_power_ratio']:.2f} | {m['vessel_density_ratio']:.2f} | "
            f"{m['other']['ms_ssim_within']:.3f} |")
    table = "\n".join(lines)
    (out / "samplers.md").write_text(table + "\n")
    (out / "samplers.json").write_text(json.dumps(rows, indent=1))
    print(table)
    # the picture: the same relocated mask under each sampler, beside the real scan it came from
    cols = [("real (held out)", real)] + list(sets.items())
    fig, axes = plt.subplots(2, len(cols), figsize=(2.1 * len(cols), 4.6), squeeze=False)
    for j, (k, vols) in enumerate(cols):
        for i in range(2):
            v = vols[i]
            z = int(np.argmax(v.mask.reshape(v.mask.shape[0], -1).sum(1))) if v.mask.any() else v.hu.shape[0] // 2
            ax = axes[i, j]
            ax.imshow(v.hu[z], cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1])
            if v.mask[z].any():
                ax.contour(v.mask[z], levels=[0.5], colors="red", linewidths=0.6)
            ax.set_title(f"{k.removeprefix(a.prefix)} #{i}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(a.figure, dpi=110)
    print("figure:", a.figure)


if __name__ == "__main__":
    main()
