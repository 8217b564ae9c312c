"""The paper's utility experiment (arXiv 2410.12542, Table 1) at CPU scale, on the phantom.

A task where the real-only nnU-Net learns (benchmarks/configs/utility.yaml says why each choice),
its own generator (the shipped phantom model fine-tuned on the real training cases only), a synthetic
set sampled with the default sampler and published through `medsyn publish`, and nnU-Net v2 trained
K times on each arm: real, synthetic, real + synthetic, real + targeted (through the request ->
sample -> publish path), plus the low-data curve (real@N and real+synthetic@N). Then the report
(`medsyn evaluate report`) and an analysis of why the arms differ.

    python benchmarks/utility.py --work /tmp/utility --out benchmarks/utility.json [--sizes 4 8]

Resumable: each stage is skipped when its output exists; a training killed half-way continues from
nnU-Net's last checkpoint. Every stage is a `medsyn` command as a user runs it (logged to WORK/log.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "configs" / "utility.yaml"


def sh(work: Path, *args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "medsyn_site.cli", *args]
    t0 = time.time()
    with open(work / "log.txt", "a") as log:
        log.write(f"\n$ medsyn {' '.join(args)}\n")
        log.flush()
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"[utility] {time.time() - t0:7.1f} s  medsyn {' '.join(args)}", flush=True)


def train_all(work: Path, ws: Path, runs: list[tuple[str, int]], cfg) -> None:
    """Every (arm, seed) training not finished yet, ``jobs`` at a time, one core each."""
    from medsyn_site.evaluate.runs import RESULT, run_dir

    ev = cfg.evaluate
    todo = [(a, s) for a, s in runs if not (run_dir(ws, a, s) / RESULT).exists()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(arm: str, seed: int) -> None:
        resume = ["--resume"] if run_dir(ws, arm, seed).exists() else []
        sh(work, "evaluate", "train", "--ws", str(ws), "--arm", arm, "--seed", str(seed), "--epochs", str(ev.epochs),
           "--iterations", str(ev.iterations), "--batch-size", str(ev.batch_size), "--no-mirroring", *resume, env=env)

    with ThreadPoolExecutor(ev.jobs) as pool:
        for f in [pool.submit(one, a, s) for a, s in todo]:
            f.result()


def nodule_hu(root: Path) -> list[dict]:
    """Per nodule (connected component of the mask): its mean HU, its contrast against a 2-voxel shell
    (medsyn_site.quality.nodule_contrasts, as the publish gate scores adherence), its equivalent
    diameter and, where the cohort lists it, its type."""
    from medsyn_site.data.cohort import Cohort
    from medsyn_site.imaging import diameters_mm, label_nodules
    from medsyn_site.quality import nodule_contrasts

    cohort = Cohort(root)
    out = []
    for rec in cohort.cases:
        hu, mask = cohort.arrays(rec.id)
        labels, n = label_nodules(mask)
        sizes = diameters_mm(labels, rec.spacing[::-1])
        types = {int(labels[z, y, x]): nod.type for nod in rec.nodules
                 for x, y, z in [nod.center_voxel] if labels[z, y, x]}
        contrasts = nodule_contrasts(hu, mask)
        if len(contrasts) != n:  # a nodule with no shell around it is left out: the labels no longer line up
            types, sizes = {}, [float("nan")] * len(contrasts)
        for i, c in enumerate(contrasts, start=1):
            out.append({"case": rec.id, "type": types.get(i, "unknown"),
                        "diameter_mm": round(sizes[i - 1], 1),
                        "mean_hu": c.inside_hu, "contrast_hu": c.contrast})
    return out


def analyse(work: Path, ws: Path) -> dict:
    """Why the arms differ: the synthetic nodules' HU against real ones per type, where the
    synthetic-trained models' false positives sit, and which nodules real + synthetic finds that
    real alone misses (and the reverse)."""
    import SimpleITK as sitk

    sys.path.insert(0, str(HERE))
    from phantom_difficulty import classify_false_positives

    from medsyn_site.data.cohort import Cohort
    from medsyn_site.evaluate.report import collect
    from medsyn_site.realism import NODULE_TYPES

    res = {}
    real_nod = nodule_hu(work / "cohort")
    syn_nod = nodule_hu(work / "release" / "nifti")

    def hu_stats(rows):
        v = np.array([r["mean_hu"] for r in rows]) if rows else np.array([np.nan])
        c = np.array([r["contrast_hu"] for r in rows]) if rows else np.array([np.nan])
        return {"n": len(rows), "mean_hu_q10_50_90": [round(float(x), 0) for x in np.nanpercentile(v, [10, 50, 90])],
                "contrast_hu_median": round(float(np.nanmedian(c)), 0)}

    # a release records each nodule's type (that of the real nodule whose mask conditioned it)
    res["nodule_hu"] = {}
    for name, rows in (("real", real_nod), ("synthetic", syn_nod)):
        res["nodule_hu"] |= {f"{name} {t}": hu_stats([n for n in rows if n["type"] == t]) for t in NODULE_TYPES
                             if name == "real" or any(n["type"] == t for n in rows)}
        res["nodule_hu"][f"{name} (all)"] = hu_stats(rows)
    # one mode or the real two (solid / ground-glass)?
    for name, rows in (("real", real_nod), ("synthetic", syn_nod)):
        v = np.array([r["mean_hu"] for r in rows])
        res["nodule_hu"][f"{name} fraction solid-like (mean HU > -300)"] = round(float((v > -300).mean()), 3)

    done, _ = collect(ws)
    real = Cohort(work / "cohort")
    fps = {}
    for arm in ("real", "synthetic", "real+synthetic"):
        tot = {"vessel": 0, "pleura": 0, "other": 0}
        for r in done.get(arm, []):
            for case in real.split("test"):
                hu, gt = real.arrays(case.id)
                pred = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(r["pred_test"]) / f"{case.id}.nii.gz")))
                for k, v in classify_false_positives(hu, gt, pred).items():
                    tot[k] += v
        n = max(1, len(done.get(arm, [])) * len(real.split("test")))
        fps[arm] = {k: round(v / n, 2) for k, v in tot.items()}
    res["false_positives_per_case_by_site"] = fps

    def found_majority(arm):
        out = {}
        for r in done.get(arm, []):
            for case, det in r["detection"].items():
                for i, n in enumerate(det["nodules"]):
                    out.setdefault((case, i), [n, []])[1].append(n["found"])
        return {k: (v[0], np.mean(v[1]) > 0.5) for k, v in out.items()}

    if "real" in done and "real+synthetic" in done:
        a, b = found_majority("real"), found_majority("real+synthetic")
        gained = [b[k][0] for k in b if b[k][1] and not a[k][1]]
        lost = [a[k][0] for k in a if a[k][1] and not b[k][1]]
        res["real+synthetic vs real (nodules found by the majority of trainings)"] = {
            "found only with synthetic": [f"{n['type']} {n['diameter_mm']} mm" for n in gained],
            "found only without synthetic": [f"{n['type']} {n['diameter_mm']} mm" for n in lost]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/medsyn-utility")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--sizes", type=int, nargs="*", default=[4, 8], help="real-set sizes of the low-data curve")
    ap.add_argument("--curve-seeds", type=int, default=None, help="trainings per low-data arm (default: the config's seeds; they run seed by seed, last)")
    ap.add_argument("--out", default=None, help="JSON summary (the report's numbers + the analysis)")
    args = ap.parse_args()
    from medsyn_site.config import load_config
    from medsyn_site.evaluate.datasets import load_workspace, subset_arms

    cfg = load_config(args.config)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cohort, run, synth, release, ws = (work / n for n in ("cohort", "run", "synthetic", "release", "ws"))
    key = work / "site.key"
    cfgs = ["--config", args.config]
    t0 = time.time()
    if not (cohort / "cohort.json").exists():
        sh(work, "data", "phantom", "--out", str(cohort), *cfgs)
        sh(work, "data", "show", str(cohort), "--out", str(work / "cohort.png"))
    if not (run / "checkpoints" / f"step_{cfg.train.steps:08d}").is_dir():
        sh(work, "train", *cfgs, "--cohort", str(cohort), "--out", str(run), *(["--resume"] if run.exists() else []))
    if not key.exists():
        sh(work, "site-key", "new", str(key))
    if not (synth / "provenance.json").exists():
        sh(work, "sample", "--run", str(run), "--masks", f"relocate:{cohort}", "--out", str(synth), "--site-key", str(key))
        sh(work, "data", "show", str(synth), "--out", str(work / "synthetic.png"))
    if not (release / "dataset_card.json").exists():
        sh(work, "publish", str(synth), "--training-cohort", str(cohort), "--out", str(release), "--format", "nifti",
           "--site-key", str(key), "--force")
    if not (ws / "workspace.json").exists():
        sh(work, "evaluate", "prepare", "--ws", str(ws), "--real", str(cohort), "--synthetic", str(release / "nifti"),
           "--configuration", cfg.evaluate.configuration, "--seeds", str(cfg.evaluate.seeds),
           *[a for n in args.sizes for a in ("--real-sizes", str(n))])
    seeds = range(cfg.evaluate.seeds)
    train_all(work, ws, [(a, s) for s in seeds for a in ("real", "synthetic", "real+synthetic")], cfg)
    # targeted: the central side selects, the site samples and publishes, the central side trains
    targeted = work / "targeted"
    if not (targeted / "release" / "dataset_card.json").exists():
        sh(work, "evaluate", "select-targeted", "--ws", str(ws))
        sh(work, "sample", "--run", str(run), "--masks", f"request:{ws / 'targeted_request.json'}", "--request-cohort",
           str(cohort), "--out", str(targeted / "synthetic"), "--site-key", str(key), "--force")
        sh(work, "publish", str(targeted / "synthetic"), "--training-cohort", str(cohort), "--out",
           str(targeted / "release"), "--format", "nifti", "--site-key", str(key), "--force")
    if "real+targeted" not in load_workspace(ws)["arms"]:
        from medsyn_site.evaluate.datasets import prepare_workspace

        prepare_workspace(ws, cohort, targeted=targeted / "release" / "nifti",
                          configuration=cfg.evaluate.configuration, arms=["real+targeted"])
    curve = [(a, s) for s in range(args.curve_seeds or cfg.evaluate.seeds) for a in subset_arms(args.sizes)]
    train_all(work, ws, [("real+targeted", s) for s in seeds] + curve, cfg)  # one queue: no core idles
    sh(work, "evaluate", "report", "--ws", str(ws))
    report = json.loads((ws / "report" / "report.json").read_text())
    summary = {"command": "python benchmarks/utility.py " + " ".join(sys.argv[1:]), "config": args.config,
               "wall_s_this_invocation": round(time.time() - t0), "report": report, "analysis": analyse(work, ws)}
    print(report["conclusion"])
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
