"""Does the generator learn? Train the DDPM on the phantom and, at points along training, sample whole
volumes from relocated masks of held-out scans and measure them against held-out real scans and
against the untrained model (a benchmark, not a test: tens of minutes to hours on a CPU).

  realism        tissue fractions by HU (air, lung, soft tissue, bone), 1-D Wasserstein distance of
                 the HU distribution, body and lung shape (Dice with the best-matching real scan), a
                 classifier two-sample test (realism.cnn_c2st: a 3-D CNN trained to convergence on
                 patches of half the volumes, tested on the other half's; 0.5 = indistinguishable;
                 benchmarks/realism.py has every realism measure with its real-vs-real baseline)
  adherence      nodule contrast (mean HU in the conditioning mask minus a 2-voxel shell) per nodule
                 type, and the Dice at the masks of a MONAI UNet segmenter trained on real scans only
  samplers       DDIM 10/20/50 against DDPM with every training step, at the final checkpoint

Every stage keeps its outputs in --out and is skipped when they exist, so the command can be
stopped and re-run (more --steps-at points continue the same run with `medsyn train --resume`).

  python benchmarks/quality.py --out benchmarks/out/quality --steps-at 0 250 500 1000 2000 3000
  python benchmarks/quality.py --out benchmarks/out/quality --samplers ddim:10 ddim:20 ddim:50 ddpm:1000
  python benchmarks/quality.py --out benchmarks/out/quality --export medsyn_site/pretrained/phantom-tiny.pt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from medsyn_site import quality, realism  # noqa: E402
from medsyn_site.config import SplitConfig, load_config  # noqa: E402
from medsyn_site.data.cohort import Cohort  # noqa: E402
from medsyn_site.imaging import label_nodules  # noqa: E402
from medsyn_site.data.phantom import write_phantom_cohort  # noqa: E402
from medsyn_site.data.show import LUNG_WINDOW  # noqa: E402
from medsyn_site.publish import adherence  # noqa: E402

ALL_TRAIN = SplitConfig(train=1.0, val=0.0)  # relocate: takes a cohort's train split


def cohorts(cfg, out: Path, cases: int, heldout: int) -> tuple[Path, Path]:
    train, held = out / "cohort", out / "heldout"
    ph = cfg.data.phantom
    if not (train / "cohort.json").exists():
        write_phantom_cohort(ph.model_copy(update={"cases": cases, "seed": 0}), ALL_TRAIN, train, force=True)
    if not (held / "cohort.json").exists():
        write_phantom_cohort(ph.model_copy(update={"cases": heldout, "seed": 7}), ALL_TRAIN, held, force=True)
    return train, held


def initial_weights_file(cfg, path: Path) -> None:
    from medsyn_site.diffusion.model import build_unet

    torch.manual_seed(cfg.train.seed)
    net = build_unet(cfg.model)
    torch.save({"ema": net.state_dict(), "step": 0, "model": cfg.model.model_dump(mode="json"),
                "diffusion": cfg.diffusion.model_dump(mode="json")}, path)


def train_to(cfg, cohort: Path, out: Path, steps: int) -> Path:
    """EMA weights after ``steps`` training steps (one run, resumed from point to point)."""
    from medsyn_site.diffusion.train import train

    wfile = out / "weights" / f"step_{steps:06d}.pt"
    if wfile.exists():
        return wfile
    wfile.parent.mkdir(parents=True, exist_ok=True)
    if steps == 0:
        initial_weights_file(cfg, wfile)
        return wfile
    run = out / "run"
    t0 = time.perf_counter()
    resume = (run / "checkpoints" / "latest").exists()
    latest = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})}), cohort, run,
                   resume=resume, force=not resume)
    shutil.copy(latest, wfile)
    log_time(out, f"train_to_{steps}", time.perf_counter() - t0)
    return wfile


def log_time(out: Path, what: str, seconds: float) -> None:
    path = out / "times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[what] = round(seconds, 1)
    path.write_text(json.dumps(times, indent=1))


class Reference:
    """The held-out real scans: their volumes, masks, bodies, lungs and nodule types."""

    def __init__(self, held: Path, segmenter: adherence.Segmenter):
        c = Cohort(held)
        self.cases = c.cases
        self.arrays = [c.arrays(r.id) for r in c.cases]
        self.bodies = [quality.body_mask(a) for a, _ in self.arrays]
        self.lungs = [quality.lung_region(a, b) for (a, _), b in zip(self.arrays, self.bodies)]
        self.types = {}  # voxel count of a nodule -> type (relocation flips and moves, keeps the count)
        for rec, (_, m) in zip(c.cases, self.arrays):
            self.types |= realism.record_types(rec, m)
        self.segmenter = segmenter
        self.segmenter_id = hashlib.sha256(segmenter.path.read_bytes()).hexdigest()[:16]
        self.metrics = measure(self, [(a.astype(np.float32), m) for a, m in self.arrays], real=True)


def _typed_contrasts(ref: Reference, hu, mask) -> list[tuple[str, float]]:
    labels, n = label_nodules(mask)
    out = []
    for lab in range(1, n + 1):
        comp = labels == lab
        c = quality.nodule_contrasts(hu, comp)
        if c:
            out.append((ref.types.get(int(comp.sum()), "unknown"), c[0].contrast, c[0].cnr))
    return out


def measure(ref: Reference, volumes: list[tuple[np.ndarray, np.ndarray]], real: bool = False) -> dict:
    """The realism and adherence numbers of a set of (HU, conditioning mask) volumes."""
    rows = []
    pooled_real = np.concatenate([a.ravel() for a, _ in ref.arrays]).astype(np.float32)
    for hu, mask in volumes:
        body = quality.body_mask(hu)
        lung = quality.lung_region(hu, body)
        others = [i for i in range(len(ref.arrays)) if not (real and ref.arrays[i][0].shape == hu.shape
                                                           and np.array_equal(ref.arrays[i][0], hu))]
        typed = _typed_contrasts(ref, hu, mask)
        rows.append({"tissue": quality.tissue_fractions(hu), "hu_w1": quality.hu_distance(hu, pooled_real),
                     "body_dice": max(quality.dice(body, ref.bodies[i]) for i in others),
                     "lung_dice": max(quality.dice(lung, ref.lungs[i]) for i in others),
                     "contrast": typed})
    by_type: dict[str, list[float]] = {}
    for r in rows:
        for t, c, _ in r["contrast"]:
            by_type.setdefault(t, []).append(c)
    cnrs = [k for r in rows for _, _, k in r["contrast"]]
    return {"n": len(rows),
            "tissue": {k: float(np.mean([r["tissue"][k] for r in rows])) for k in rows[0]["tissue"]},
            "hu_w1": float(np.mean([r["hu_w1"] for r in rows])),
            "body_dice": float(np.mean([r["body_dice"] for r in rows])),
            "lung_dice": float(np.mean([r["lung_dice"] for r in rows])),
            "contrast": float(np.mean([c for v in by_type.values() for c in v])) if by_type else None,
            "contrast_by_type": {t: float(np.mean(v)) for t, v in sorted(by_type.items())},
            "cnr": float(np.mean(cnrs)) if cnrs else None,
            "seg_dice": seg_dice(ref, volumes), "segmenter": ref.segmenter_id}


def seg_dice(ref: Reference, volumes) -> float | None:
    """Mean neighbourhood Dice of the segmenter's nodules with the conditioning masks."""
    segs = [adherence.neighbourhood_dice(ref.segmenter(hu), mask) for hu, mask in volumes if mask.any()]
    return float(np.mean(segs)) if segs else None


def sample(weights: Path, held: Path, n: int, sampler: str = "ddim", steps: int = 20, **evaluation
           ) -> tuple[list, float]:
    from medsyn_site.diffusion.masks import mask_jobs
    from medsyn_site.diffusion.sample import Sampler

    jobs = mask_jobs(f"relocate:{held}", per_mask=1 + (n - 1) // len(Cohort(held).cases))[:n]
    gen = Sampler(weights, sampler, steps, device="cpu", **evaluation)  # window=, overlap=
    out, t0 = [], time.perf_counter()
    for i, j in enumerate(jobs):
        c = j.conditioning(0)
        hu = sitk.GetArrayFromImage(gen.volumes([c.mask], [1000 + i], [c.codes])[0])
        out.append((np.rint(hu).astype(np.int16), sitk.GetArrayFromImage(c.mask)))
    return out, (time.perf_counter() - t0) / len(jobs)


def evaluate(ref: Reference, weights: Path, held: Path, out: Path, label: str, n: int, sampler="ddim",
             steps=20) -> dict:
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    if label in results:
        m = results[label]
        if m.get("segmenter") != ref.segmenter_id:  # a new segmenter: its Dice on the kept samples
            kept = np.load(out / "samples" / f"{label}.npz")
            m["seg_dice"], m["segmenter"] = seg_dice(ref, zip(kept["hu"].astype(np.float32), kept["mask"])), ref.segmenter_id
            res_file.write_text(json.dumps(results | {label: m}, indent=1))
        return m
    vols, sec = sample(weights, held, n, sampler, steps)
    np.savez_compressed(out / "samples" / f"{label}.npz", hu=np.stack([v for v, _ in vols]),
                        mask=np.stack([m for _, m in vols]))
    m = measure(ref, [(v.astype(np.float32), mk) for v, mk in vols])
    spacing = tuple(Cohort(held).cases[0].spacing)
    m["c2st"] = realism.cnn_c2st([realism.Volume(a, mk, spacing) for a, mk in ref.arrays],
                                 [realism.Volume(v, mk, spacing) for v, mk in vols])["accuracy"]
    m["seconds_per_volume"] = sec
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    results[label] = m
    res_file.write_text(json.dumps(results, indent=1))
    print(label, json.dumps(_short(m)), flush=True)
    return m


def _short(m: dict) -> dict:
    return {"air": round(m["tissue"]["air"], 3), "lung": round(m["tissue"]["lung"], 3),
            "soft": round(m["tissue"]["soft"], 3), "bone": round(m["tissue"]["bone"], 3),
            "w1": round(m["hu_w1"], 1), "body": round(m["body_dice"], 3), "lungD": round(m["lung_dice"], 3),
            "contrast": m["contrast"] and round(m["contrast"], 1), "cnr": m.get("cnr") and round(m["cnr"], 2),
            "seg": m["seg_dice"] and round(m["seg_dice"], 3),
            "c2st": m.get("c2st") and round(m["c2st"], 3)}


def figures(ref: Reference, out: Path, labels: list[str], grid: str = "quality_grid.png") -> None:
    results = json.loads((out / "results.json").read_text())
    labels = [lab for lab in labels if lab in results]
    # the grid: synthetic axial slices (through a nodule) at each training point, real ones last
    cols = 4
    fig, axes = plt.subplots(len(labels) + 1, cols, figsize=(2.2 * cols, 2.3 * (len(labels) + 1)), squeeze=False)
    rows = [(lab, np.load(out / "samples" / f"{lab}.npz")) for lab in labels]
    rows.append(("real (held out)", {"hu": np.stack([a for a, _ in ref.arrays]),
                                     "mask": np.stack([m for _, m in ref.arrays])}))
    for ax_row, (lab, d) in zip(axes, rows):
        for k, ax in enumerate(ax_row):
            ax.axis("off")
            if k >= len(d["hu"]):
                continue
            hu, mask = d["hu"][k], d["mask"][k]
            z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1))) if mask.any() else hu.shape[0] // 2
            ax.imshow(hu[z], cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1])
            if mask[z].any():
                ax.contour(mask[z], levels=[0.5], colors="red", linewidths=0.7)
            ax.set_title(f"{lab} #{k}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / grid, dpi=100)
    plt.close(fig)
    # the curves over training steps
    steps = [(int(lab.split("_")[1]), results[lab]) for lab in labels if lab.startswith("step_")]
    if not steps:
        return
    x = [s for s, _ in steps]
    real = ref.metrics
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for k, c in zip(("air", "lung", "soft", "bone"), ("C0", "C1", "C2", "C3")):
        axes[0].plot(x, [m["tissue"][k] for _, m in steps], "o-", color=c, label=k)
        axes[0].axhline(real["tissue"][k], color=c, ls=":")
    axes[0].set_title("tissue fractions (dotted: real)")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, [m["hu_w1"] for _, m in steps], "o-")
    axes[1].set_title("HU Wasserstein to real (HU)")
    axes[1].set_yscale("log")
    for k, c in (("body_dice", "C0"), ("lung_dice", "C1"), ("seg_dice", "C2"), ("c2st", "C3")):
        axes[2].plot(x, [m.get(k) if m.get(k) is not None else np.nan for _, m in steps], "o-", color=c, label=k)
        if real.get(k) is not None:
            axes[2].axhline(real[k], color=c, ls=":")
    axes[2].set_title("shape Dice, segmenter Dice, C2ST acc.")
    axes[2].legend(fontsize=7)
    axes[3].plot(x, [m["contrast"] if m["contrast"] is not None else np.nan for _, m in steps], "o-", label="all")
    axes[3].axhline(real["contrast"], color="k", ls=":", label="real")
    axes[3].set_title("nodule contrast (HU)")
    axes[3].legend(fontsize=7)
    for a in axes:
        a.set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(out / "quality_curves.png", dpi=100)
    plt.close(fig)


def table(ref: Reference, out: Path) -> str:
    results = json.loads((out / "results.json").read_text())
    head = ("| | air | lung | soft | bone | HU W1 | body Dice | lung Dice | contrast HU (solid/part/GGO) | CNR | "
            "seg Dice | C2ST | s/vol |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(name, m):
        ct = m["contrast_by_type"]
        types = "/".join(f"{ct[t]:.0f}" if t in ct else "-" for t in ("solid", "part-solid", "ground-glass"))
        f = (lambda v, p=3: "-" if v is None else f"{v:.{p}f}")
        lines.append(f"| {name} | {m['tissue']['air']:.3f} | {m['tissue']['lung']:.3f} | {m['tissue']['soft']:.3f} | "
                     f"{m['tissue']['bone']:.3f} | {m['hu_w1']:.0f} | {m['body_dice']:.3f} | {m['lung_dice']:.3f} | "
                     f"{f(m['contrast'], 0)} ({types}) | {f(m.get('cnr'), 2)} | {f(m['seg_dice'])} | {f(m.get('c2st'))} | "
                     f"{f(m.get('seconds_per_volume'), 1)} |")
    for lab, m in results.items():
        row(lab, m)
    row("real (held out)", ref.metrics)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/quality")
    ap.add_argument("--config", default=None, help="default: the package's configs/tiny.yaml")
    ap.add_argument("--cases", type=int, default=16, help="training phantom cases")
    ap.add_argument("--heldout", type=int, default=6, help="held-out real phantom cases")
    ap.add_argument("--steps-at", type=int, nargs="*", default=[], help="training steps to evaluate at")
    ap.add_argument("--samples", type=int, default=6, help="synthetic volumes per evaluation")
    ap.add_argument("--samplers", nargs="*", default=[], help="at the last --steps-at point: e.g. ddim:10 ddpm:1000")
    ap.add_argument("--sampler-samples", type=int, default=2, help="volumes per sampler in --samplers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--segmenter-steps", type=int, default=400)
    ap.add_argument("--export", default=None, help="copy the last checkpoint's EMA weights here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
    out = Path(a.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    cfg = load_config(a.config, {"train.threads": a.threads, "train.preview_every": 10 ** 9})
    train_cohort, held = cohorts(cfg, out, a.cases, a.heldout)
    seg_file = out / "segmenter.pt"
    if not seg_file.exists():
        t0 = time.perf_counter()
        adherence.train_segmenter(train_cohort, seg_file, steps=a.segmenter_steps)
        log_time(out, "segmenter", time.perf_counter() - t0)
    ref = Reference(held, adherence.Segmenter(seg_file))
    print("real", json.dumps(_short(ref.metrics)), flush=True)
    labels = []
    for s in sorted(a.steps_at):
        w = train_to(cfg, train_cohort, out, s)
        labels.append(f"step_{s:06d}")
        evaluate(ref, w, held, out, labels[-1], a.samples)
        figures(ref, out, labels)
    done = sorted((out / "weights").glob("step_*.pt"))
    for spec in a.samplers:
        name, _, k = spec.partition(":")
        labels.append(f"final_{name}{k}")
        evaluate(ref, done[-1], held, out, labels[-1], a.sampler_samples, name, int(k))
    figures(ref, out, [lab for lab in labels if lab.startswith("step_")])
    if a.samplers:
        figures(ref, out, [lab for lab in labels if lab.startswith("final_")], "quality_samplers.png")
    (out / "table.md").write_text(table(ref, out) + "\n")
    print(table(ref, out))
    if a.export:
        blob = torch.load(done[-1], map_location="cpu")
        blob["made_by"] = f"benchmarks/quality.py --out {a.out} (training step {blob['step']})"
        Path(a.export).parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, a.export)
        print("exported", done[-1], "->", a.export)


if __name__ == "__main__":
    main()
