"""The overfit check: a model that memorizes its training scans must be stopped by `medsyn publish`.

The tiny model (configs/tiny.yaml, from the shipped phantom model) is trained on 3 phantom scans
(whole-volume patches, high learning rate) until it reproduces them; an honest model (the shipped
phantom model, trained on other phantom seeds, bound to the same cohort by one training step at a
negligible learning rate) is the control. Both sample the training masks verbatim (what lets a
memorizing model reproduce a scan), both go through `publish` (provenance, memorization audit;
--allow-verbatim-masks, so only the audit can refuse). Expected: every overfit sample refused as a
copy of the training scan whose mask it was given; every honest sample released. Writes
OUT/overfit.json and OUT/privacy_scores.png (score distributions: unseen real scans, honest and
overfit samples, thresholds). tests/test_overfit.py runs it.

    python benchmarks/overfit.py --out benchmarks/out/overfit [--steps 150]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medsyn_site.config import PhantomConfig, SplitConfig, load_config
from medsyn_site.data.cohort import Cohort
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.data.prepare import load_site_key, pseudonym
from medsyn_site.diffusion.sample import sample_cohort
from medsyn_site.diffusion.train import train
from medsyn_site.provenance import read as read_provenance
from medsyn_site.publish.release import ReleaseError, publish, score_figure

# 8 phantom cases at 32x32x24 (3 mm): 3 train, 5 held out for the audit's calibration
PHANTOM = PhantomConfig(cases=8, seed=21, shape=(32, 32, 24), spacing=(3.0, 3.0, 3.33))
SPLIT = SplitConfig(train=0.375, val=0.25)
RECIPE = {"train.init_weights": "builtin:phantom-tiny", "train.patch_size": list(PHANTOM.shape),
          "train.batch_size": 1, "train.warmup_steps": 0, "train.ema_decay": 0.9, "train.checkpoint_every": 10_000,
          "train.preview_every": 100_000, "train.log_every": 50}


def run(out: Path, steps: int = 150, threads: int = 2, sample_steps: int = 10) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cohort = out / "cohort"
    if not cohort.exists():
        write_phantom_cohort(PHANTOM, SPLIT, cohort)
    key_file = out / "site.key"
    key = load_site_key(key_file, create=True)
    source = {pseudonym(key, c.id, "src"): c.id for c in Cohort(cohort).split("train")}
    models = {"overfit": {"train.steps": steps, "train.lr": 1e-3},
              "honest": {"train.steps": 1, "train.lr": 1e-9}}  # the shipped model, bound to this cohort
    result = {"train_scans": sorted(source.values()), "steps": steps, "models": {}}
    groups = {}
    for name, over in models.items():
        t0 = time.time()
        cfg = load_config("tiny", RECIPE | over | {"train.threads": threads})
        train(cfg, cohort, out / name, force=True)
        synth = sample_cohort(out / name, f"cohort:{cohort}", out / f"{name}-samples", sampler="ddim",
                              steps=sample_steps, seed=1, force=True, site_key=key_file)
        try:
            report = publish(synth, cohort, out / f"{name}-release", fmt="nifti", allow_verbatim=True, force=True,
                             site_key=key_file)
        except ReleaseError as e:
            report = e.report
        _, entries = read_provenance(synth)
        src = {e["case"]: source[e["mask_source_id"]] for e in entries}
        cases = [{"case": c["case"], "conditioned_on": src[c["case"]], "nearest": c["scores"].get("nearest"),
                  "global": c["scores"].get("global"), "local": c["scores"].get("local"),
                  "disguise": c["scores"].get("disguise"), "released": not c["reasons"], "reasons": c["reasons"]}
                 for c in report["cases"]]
        result["models"][name] = {"cases": cases, "seconds": round(time.time() - t0, 1)}
        groups[f"{name} model's samples"] = [c["scores"] for c in report["cases"]]
        cal = report["calibration"]
    result["thresholds"] = {k: cal[k]["threshold"] for k in ("global", "local")}
    score_figure({"unseen real (calibration)": cal["null_scores"], **groups}, cal, out / "privacy_scores.png")
    (out / "overfit.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/overfit"))
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    res = run(args.out, args.steps)
    for name, m in res["models"].items():
        for c in m["cases"]:
            print(f"{name:8s} {c['case']} conditioned on {c['conditioned_on']}: nearest {c['nearest']} "
                  f"global {c['global']:.3f} local {c['local']:.3f} {'released' if c['released'] else 'REFUSED'}")
    print(f"thresholds {res['thresholds']}")


if __name__ == "__main__":
    main()
