"""The overfit check: a model that memorizes its training scans must be stopped by `medsyn publish`.

The tiny model (configs/tiny.yaml, from the shipped phantom model) is trained on 3 phantom scans
(whole-volume patches) until it reproduces them: ``steps`` at lr 1e-3 (EMA 0.9), then
``polish_steps`` at lr 3e-4 (EMA 0.99; at 1e-3 alone the loss stays noisy and after 2,000 steps one
of three samples is still a partial copy). An honest model is the control: the shipped phantom model
(trained on other phantom seeds) bound to a cohort of the same seed and split at its own size
(HONEST: 64x64x48, tiny.yaml's phantom; at 32x32x24 it draws bodies without lungs, and a sample
without lungs tests nothing), by one training step at a negligible learning rate. Each model samples
on the noise process it was trained on, its cohort's training masks verbatim (what lets a memorizing
model reproduce a scan), with DDIM-10, and goes through `publish` (provenance, memorization audit;
--allow-verbatim-masks, so only the audit can refuse) against its own cohort. Expected: every
overfit sample refused as a copy of the training scan whose mask it was given; every honest sample
released; both with lungs (``lung_fraction``). Writes OUT/overfit.json, OUT/privacy_scores.png and
OUT/privacy_scores_honest.png (score distributions of unseen real scans and each arm's samples, thresholds).

The training takes ~40 min on 2 cores, so tests/test_overfit.py does not train: it binds the
memorizing model this script exported (``--export``, tests/data/overfit-tiny.pt, with the voxel
sha256s of the scans it memorized) to a freshly written phantom cohort and runs the rest.

    python benchmarks/overfit.py --out benchmarks/out/overfit [--steps 2000 --polish-steps 500]
                                 [--export tests/data/overfit-tiny.pt]
    python benchmarks/overfit.py --out benchmarks/out/overfit --weights tests/data/overfit-tiny.pt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medsyn_site.config import ModelConfig, PhantomConfig, SplitConfig, load_config
from medsyn_site.data.cohort import Cohort
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.diffusion.rundir import RunDir
from medsyn_site.diffusion.sample import sample_cohort
from medsyn_site.diffusion.train import train, weights_path
from medsyn_site.provenance import read as read_provenance
from medsyn_site.publish.release import ReleaseError, publish, score_figure
from medsyn_site.sitekey import load_site_key, pseudonym

# 8 phantom cases at 32x32x24 (3 mm): 3 train, 5 held out for the audit's calibration
PHANTOM = PhantomConfig(cases=8, seed=21, shape=(32, 32, 24), spacing=(3.0, 3.0, 3.33))
SPLIT = SplitConfig(train=0.375, val=0.25)
# the honest arm: the same seed and split at the shipped model's own size (tiny.yaml's phantom: 64x64x48)
HONEST = PhantomConfig(cases=8, seed=21, shape=(64, 64, 48), spacing=(3.0, 3.0, 3.33))
RECIPE = {"train.init_weights": "builtin:phantom-tiny", "train.batch_size": 1, "train.warmup_steps": 0,
          "train.ema_decay": 0.9, "train.checkpoint_every": 10_000,
          "train.preview_every": 100_000, "train.log_every": 50}
WHOLE_VOLUME = {"train.patch_size": list(PHANTOM.shape)}  # the memorizing model's patch: its whole scans


def train_scans_sha256(cohort: Path) -> dict[str, str]:
    """sha256 of each training scan's voxels (int16): what a memorizing model's weights belong to."""
    c = Cohort(cohort)
    return {r.id: hashlib.sha256(c.arrays(r.id)[0].astype("<i2").tobytes()).hexdigest() for r in c.split("train")}


def tiny_config(weights: str, overrides: dict):
    """tiny.yaml with RECIPE and ``overrides``, starting from ``weights`` on the noise process and the
    mask channel they were trained on (tiny.yaml's may differ: a fine-tune may change the cosine offset
    or the nodule type levels, and a model sampled on another schedule or other mask values than its
    own is not the model: tests/data/overfit-tiny.pt saw 0/1 masks)."""
    blob = torch.load(weights_path(weights), map_location="cpu")
    own = {f"diffusion.{k}": v for k, v in (blob.get("diffusion") or {}).items()}
    typing = ModelConfig.of_weights(blob["model"])
    own |= {"model.nodule_types": typing.nodule_types, "model.type_levels": list(typing.type_levels)}
    return load_config("tiny", RECIPE | own | {"train.init_weights": weights} | overrides)


def bind(weights: str, cohort: Path, run_dir: Path, threads: int, overrides: dict | None = None) -> None:
    """A run of ``weights`` bound to ``cohort`` (its training-cohort identity): one step at lr 1e-9."""
    train(tiny_config(weights, {"train.steps": 1, "train.lr": 1e-9, "train.threads": threads} | (overrides or {})),
          cohort, run_dir, force=True)


def lung_fraction(hu: np.ndarray) -> float:
    """The share of the body (each axial slice's filled outline above -300 HU) at lung density (below
    -300 HU): 12-19 % in this phantom's scans, 0 in a sample drawn without lungs."""
    body = np.stack([ndimage.binary_fill_holes(s) for s in hu > -300])
    return float((body & (hu < -300)).sum() / max(body.sum(), 1))


def run(out: Path, steps: int = 2000, polish_steps: int = 500, threads: int = 2, sample_steps: int = 10,
        weights: Path | None = None, export: Path | None = None, honest_sampler: str = "ddim") -> dict:
    """``weights``: an exported memorizing model to use instead of training one (its scans must be
    this phantom's training scans)."""
    out.mkdir(parents=True, exist_ok=True)
    cohort, honest_cohort = out / "cohort", out / "honest-cohort"
    for cfg, path in ((PHANTOM, cohort), (HONEST, honest_cohort)):
        if not path.exists():
            write_phantom_cohort(cfg, SPLIT, path)
    key_file = out / "site.key"
    key = load_site_key(key_file, create=True)
    scans = train_scans_sha256(cohort)
    result = {"models": {}}
    t0 = time.time()
    if weights is not None:
        made = torch.load(weights, map_location="cpu")
        if made.get("train_scans_sha256") != scans:
            raise SystemExit(f"{weights}: memorized other scans than this phantom's training scans (the phantom "
                             "generator changed?); export it again: python benchmarks/overfit.py --export FILE")
        bind(str(weights), cohort, out / "overfit", threads, WHOLE_VOLUME)
        result["overfit_model"] = made.get("made_by")
    else:
        base = WHOLE_VOLUME | {"train.threads": threads}
        first = out / ("overfit-1" if polish_steps else "overfit")
        train(tiny_config("builtin:phantom-tiny", base | {"train.steps": steps, "train.lr": 1e-3}), cohort, first,
              force=True)
        if polish_steps:
            train(tiny_config("builtin:phantom-tiny", base | {"train.init_weights": str(first), "train.steps": polish_steps,
                                                              "train.lr": 3e-4, "train.ema_decay": 0.99}),
                  cohort, out / "overfit", force=True)
        result["overfit_model"] = f"{steps} steps at lr 1e-3 + {polish_steps} at 3e-4"
    result["train_seconds"] = round(time.time() - t0, 1)
    # the shipped model at its own size and patch (at 32x32x24 it draws bodies without lungs)
    bind("builtin:phantom-tiny", honest_cohort, out / "honest", threads)
    arms = {"overfit": (cohort, "ddim"), "honest": (honest_cohort, honest_sampler)}
    for name, (real, sampler) in arms.items():
        t0 = time.time()
        source = {pseudonym(key, c.id, "src"): c.id for c in Cohort(real).split("train")}
        synth = sample_cohort(out / name, f"cohort:{real}", out / f"{name}-samples", sampler=sampler,
                              steps=sample_steps, seed=1, force=True, site_key=key_file)
        try:
            report = publish(synth, real, out / f"{name}-release", fmt="nifti", allow_verbatim=True, force=True,
                             site_key=key_file)
        except ReleaseError as e:
            report = e.report
        _, entries = read_provenance(synth)
        src = {e["case"]: source[e["mask_source_id"]] for e in entries}
        synth_cohort = Cohort(synth)
        cases = [{"case": c["case"], "conditioned_on": src[c["case"]], "nearest": c["scores"].get("nearest"),
                  "lung_fraction": round(lung_fraction(synth_cohort.arrays(c["case"])[0]), 3),
                  "global": c["scores"].get("global"), "local": c["scores"].get("local"),
                  "disguise": c["scores"].get("disguise"), "released": not c["reasons"], "reasons": c["reasons"]}
                 for c in report["cases"]]
        cal = report["calibration"]
        result["models"][name] = {
            "sampler": f"{sampler} {sample_steps}", "cases": cases, "seconds": round(time.time() - t0, 1),
            "thresholds": {k: cal[k]["threshold"] for k in ("global", "local")},
            "train_lung_fraction": {c.id: round(lung_fraction(Cohort(real).arrays(c.id)[0]), 3)
                                    for c in Cohort(real).split("train")}}
        score_figure({"unseen real (calibration)": cal["null_scores"],
                      f"{name} model's samples": [c["scores"] for c in report["cases"]]}, cal,
                     out / ("privacy_scores.png" if name == "overfit" else f"privacy_scores_{name}.png"))
    (out / "overfit.json").write_text(json.dumps(result, indent=1, default=str))
    if export is not None and weights is None:
        blob = torch.load(RunDir(out / "overfit").latest_weights(), map_location="cpu")
        blob["made_by"] = f"benchmarks/overfit.py ({result['overfit_model']})"
        blob["train_scans_sha256"] = scans
        export.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, export)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/overfit"))
    ap.add_argument("--steps", type=int, default=2000, help="steps at lr 1e-3")
    ap.add_argument("--polish-steps", type=int, default=500, help="then steps at lr 3e-4")
    ap.add_argument("--weights", type=Path, default=None, help="an exported memorizing model instead of training")
    ap.add_argument("--export", type=Path, default=None, help="save the memorizing model's weights here")
    ap.add_argument("--honest-sampler", default="ddim", help="the honest arm's sampler (the overfit arm: ddim)")
    args = ap.parse_args()
    res = run(args.out, args.steps, args.polish_steps, weights=args.weights, export=args.export,
              honest_sampler=args.honest_sampler)
    for name, m in res["models"].items():
        for c in m["cases"]:
            print(f"{name:8s} {c['case']} conditioned on {c['conditioned_on']}: lungs {c['lung_fraction']:.3f} nearest {c['nearest']} "
                  f"global {c['global']:.3f} local {c['local']:.3f} {'released' if c['released'] else 'REFUSED'}")
    for name, m in res["models"].items():
        print(f"{name}: {m['sampler']}, thresholds {m['thresholds']}, training scans' lungs {m['train_lung_fraction']}")


if __name__ == "__main__":
    main()
