"""Realism a classifier cannot tell? Every measure of medsyn_site/realism.py for generators on the
phantom at the demo's size, each beside the same measure between two real phantom sets.

  real-vs-real   6 held-out phantom scans (seed 7) against 6 others (seed 8): the baseline
  MODEL          6 whole volumes sampled (DDPM-50 by default) from the seed-7 scans' masks, relocated
                 as `medsyn sample --masks relocate:` does, against those 6 real scans

Stages keep their outputs in --out and are skipped when they exist (stop and re-run freely):

  python benchmarks/realism.py --out benchmarks/out/realism \\
      --model shipped=medsyn_site/pretrained/phantom-tiny.pt \\
      --model long3000=benchmarks/out/realism/run_long/checkpoints/step_00003000/ema.pt
  python benchmarks/realism.py --out benchmarks/out/realism --export long3000 medsyn_site/pretrained/phantom-tiny.pt
  python benchmarks/realism.py --out benchmarks/out/realism --pair utility=/tmp/u22/cohort:/tmp/u22/synthetic
  python benchmarks/realism.py --out benchmarks/out/realism --samples 4 \
      --model dpm++10=medsyn_site/pretrained/phantom-tiny.pt@dpm++:10   # a sampler on the shipped weights

The training runs it measures are made with `medsyn train` (their configs in benchmarks/configs/);
the command of each is in benchmarks/RESULTS.md ("Realism").
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import quality as quality_bench  # noqa: E402  (benchmarks/quality.py: the same relocated-mask sampling)
from medsyn_site import realism  # noqa: E402
from medsyn_site.config import SplitConfig, load_config  # noqa: E402
from medsyn_site.data.phantom import write_phantom_cohort  # noqa: E402
from medsyn_site.data.show import LUNG_WINDOW  # noqa: E402

ALL_TRAIN = SplitConfig(train=1.0, val=0.0)
SOFT_WINDOW = (-160, 240)  # soft-tissue window (level 40, width 400)
BASELINE = "real-vs-real"


def cohorts(out: Path) -> dict[str, Path]:
    """The training phantoms (16, seed 0: what the shipped model saw) and two held-out real sets."""
    ph = load_config(None).data.phantom
    paths = {"cohort": (16, 0), "heldout": (6, 7), "heldout2": (6, 8)}
    for name, (cases, seed) in paths.items():
        if not (out / name / "cohort.json").exists():
            write_phantom_cohort(ph.model_copy(update={"cases": cases, "seed": seed}), ALL_TRAIN, out / name, force=True)
    return {name: out / name for name in paths}


def measure(out: Path, label: str, real: list, other: list, cnn_steps: int, extra: dict | None = None) -> dict:
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    if label not in results:
        t0 = time.perf_counter()
        results[label] = realism.compare(real, other, cnn_steps=cnn_steps) | (extra or {})
        results[label]["measure_seconds"] = round(time.perf_counter() - t0, 1)
        res_file.write_text(json.dumps(results, indent=1))
    print(label, json.dumps(short(results[label])), flush=True)
    return results[label]


def short(m: dict) -> dict:
    f = (lambda v, p=3: None if v is None else round(v, p))
    return {"cnn": f(m["cnn_c2st"]["accuracy"]), "feat": f(m["feature_c2st"]["accuracy"]), "mmd": f(m["mmd"], 5),
            "w1_lung": f(m["hu_w1"]["lung"], 1), "w1_wall": f(m["hu_w1"]["wall"], 1),
            "hf": f(m["lung_high_frequency_power_ratio"]), "vessels": f(m["vessel_density_ratio"]),
            "conn": f(m["vessel_connectivity_ratio"]), "outline": f(m["outline_sharpness_ratio"]),
            "contrast": {t: f(v["ratio"], 2) for t, v in m["contrast_by_type"].items()},
            "ms_ssim": f(m["other"]["ms_ssim_within"])}


def table(results: dict) -> str:
    head = ("| | CNN C2ST | feature C2ST | MMD x1e3 | HU W1 lung / wall | high-freq. lung power | vessel density | "
            "vessel connectivity | outline sharpness | nodule contrast solid / part / GGO | MS-SSIM within |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, m in results.items():
        ct = m["contrast_by_type"]
        f = (lambda v, p=2: "-" if v is None else f"{v:.{p}f}")
        types = " / ".join(f(ct[t]["ratio"]) if t in ct else "-" for t in realism.NODULE_TYPES)
        lines.append(
            f"| {label} | {m['cnn_c2st']['accuracy']:.3f} +- {m['cnn_c2st']['std']:.3f} | "
            f"{m['feature_c2st']['accuracy']:.3f} +- {m['feature_c2st']['std']:.3f} | {1e3 * m['mmd']:.2f} | "
            f"{f(m['hu_w1']['lung'], 0)} / {f(m['hu_w1']['wall'], 0)} | {f(m['lung_high_frequency_power_ratio'])} | "
            f"{f(m['vessel_density_ratio'])} | {f(m['vessel_connectivity_ratio'])} | {f(m['outline_sharpness_ratio'])} | "
            f"{types} | {f(m['other']['ms_ssim_within'], 3)} (real {f(m['real']['ms_ssim_within'], 3)}) |")
    return "\n".join(lines)


def figures(out: Path, real: list, sets: dict[str, list]) -> None:
    """Side by side: a real scan and each model's sample from the same (relocated) mask, axial slice
    through its largest nodule in the lung and soft-tissue windows; then HU histograms, lung
    spectra and the CNN's held-out curves."""
    results = json.loads((out / "results.json").read_text())
    rows = [("real (held out)", real)] + list(sets.items())
    fig, axes = plt.subplots(len(rows), 4, figsize=(9, 2.3 * len(rows)), squeeze=False)
    for ax_row, (label, vols) in zip(axes, rows):
        for k, ax in enumerate(ax_row):
            v = vols[k // 2]
            z = int(np.argmax(v.mask.reshape(v.mask.shape[0], -1).sum(1))) if v.mask.any() else v.hu.shape[0] // 2
            win = LUNG_WINDOW if k % 2 == 0 else SOFT_WINDOW
            ax.imshow(v.hu[z], cmap="gray", vmin=win[0], vmax=win[1])
            ax.set_title(f"{label} #{k // 2} {'lung' if k % 2 == 0 else 'soft tissue'}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "realism_slices.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    bins = np.arange(-1024, 1025, 16)
    for label, vols in rows:
        for ax, reg in zip(axes[:2], ("lung", "wall")):
            ax.hist(np.clip(realism.region_values(vols, reg), -1024, 1024), bins, density=True, histtype="step",
                    label=label)
        spec = realism.describe(vols)["lung_spectrum"] if label.startswith("real") else results[label]["other"]["lung_spectrum"]
        if spec:
            axes[2].semilogy(np.linspace(0, 0.5, len(spec)), spec, "o-", label=label)
    for ax, t in zip(axes, ("HU in the lung cavity", "HU in the body wall", "lung power spectrum (HU^2)")):
        ax.set_title(t, fontsize=9)
        ax.legend(fontsize=6)
    axes[2].set_xlabel("cycles per voxel")
    for label, m in results.items():
        c = m["cnn_c2st"]["curves"][0]
        axes[3].plot([s for s, *_ in c], [h for *_, h in c], label=f"{label} held out")
        axes[3].plot([s for s, *_ in c], [t for _, _, t, _ in c], ":", label=f"{label} training")
    axes[3].axhline(0.5, color="k", lw=0.5)
    axes[3].set_title("CNN C2ST accuracy (fold 1)", fontsize=9)
    axes[3].set_xlabel("step")
    axes[3].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "realism_measures.png", dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/realism")
    ap.add_argument("--model", action="append", default=[],
                    help="LABEL=WEIGHTS (an ema.pt or a pretrained .pt), optionally @SAMPLER:STEPS (default --sampler)")
    ap.add_argument("--sampler", default="ddpm:50")
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--cnn-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pair", action="append", default=[], metavar="LABEL=REAL:SYNTHETIC",
                    help="an existing synthetic cohort against its real cohort's train split (types by voxel "
                         "count), beside the real test split against the same (LABEL real-vs-real)")
    ap.add_argument("--export", nargs=2, metavar=("LABEL", "PATH"), help="ship LABEL's weights as PATH")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MASTER_PORT", str(29900 + os.getpid() % 90))
    out = Path(a.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    paths = cohorts(out)
    real = realism.cohort_volumes(paths["heldout"])
    types = realism.nodule_types(real)
    measure(out, BASELINE, real, realism.cohort_volumes(paths["heldout2"]), a.cnn_steps)
    sets, made = {}, json.loads((out / "models.json").read_text()) if (out / "models.json").exists() else {}
    for spec in a.model:
        label, _, weights = spec.partition("=")
        weights, _, how = weights.partition("@")
        sampler, _, steps = (how or a.sampler).partition(":")
        npz = out / "samples" / f"{label}.npz"
        if not npz.exists():
            vols, sec = quality_bench.sample(Path(weights), paths["heldout"], a.samples, sampler, int(steps))
            hu, mask = np.stack([v for v, _ in vols]), np.stack([m for _, m in vols])
            np.savez_compressed(npz, hu=hu, mask=mask)
            made[label] = {"weights": weights, "sampler": f"{sampler}:{steps}", "seconds_per_volume": round(sec, 1),
                           "samples": len(vols)}
            (out / "models.json").write_text(json.dumps(made, indent=1))
        d = np.load(npz)
        sets[label] = [realism.Volume(h, m, real[0].spacing, types) for h, m in zip(d["hu"], d["mask"])]
        measure(out, label, real, sets[label], a.cnn_steps, made.get(label))
    for spec in a.pair:  # e.g. the utility benchmark's task: its real cohort and its generator's samples
        label, _, pair = spec.partition("=")
        real_root, _, synth_root = pair.partition(":")
        train = realism.cohort_volumes(real_root, "train")
        measure(out, f"{label} real-vs-real", train, realism.cohort_volumes(real_root, "test"), a.cnn_steps)
        measure(out, label, train, realism.cohort_volumes(synth_root, types=realism.nodule_types(train)), a.cnn_steps)
    results = json.loads((out / "results.json").read_text())
    if sets:
        figures(out, real, sets)
    (out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    if a.export:
        label, dest = a.export
        blob = torch.load(made[label]["weights"], map_location="cpu")
        blob["made_by"] = (f"medsyn train with benchmarks/configs/ ({label}, training step {blob.get('step')}); "
                           f"measured by benchmarks/realism.py --out {a.out}")
        torch.save(blob, dest)
        print("exported", made[label]["weights"], "->", dest)


if __name__ == "__main__":
    main()
