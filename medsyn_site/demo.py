"""``medsyn demo``: every stage that exists, on the built-in phantom cohort, at CPU size."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path

from medsyn_site.atomic import atomic_write_text, refuse_existing
from medsyn_site.config import Config, dump_config
from medsyn_site.data.cohort import CohortError, validate_cohort
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.data.show import show_cohort
from medsyn_site.progress import log as progress

STAGES = ("data", "train", "sample", "publish", "evaluate")


def _say(i: int, text: str) -> None:
    progress.info(f"[demo {i}/{len(STAGES)} {STAGES[i - 1]}] {text}")


def quality_report(real: Path, synth: Path, out: Path) -> dict:
    """Realism (tissue fractions, body and lung fractions) and mask adherence (nodule contrast) of the
    synthetic volumes against the real cohort's scans; written to ``out`` (JSON) and returned."""
    import json

    import numpy as np

    from medsyn_site import quality
    from medsyn_site.data.cohort import Cohort

    def volumes(root: Path) -> list:
        c = Cohort(root)
        return [c.arrays(r.id) for r in c.cases]
    real_vols = volumes(real)
    real_hu = np.concatenate([hu.ravel() for hu, _ in real_vols])
    res = {"real": quality.mean_summary(real_vols, real_hu), "synthetic": quality.mean_summary(volumes(synth), real_hu)}
    r, s = res["real"], res["synthetic"]
    res["lines"] = [
        "realism (synthetic vs real): " + ", ".join(f"{k} {s['tissue'][k]:.3f} vs {r['tissue'][k]:.3f}"
                                                     for k in ("air", "lung", "soft", "bone"))
        + f"; body {s['body_fraction']:.3f} vs {r['body_fraction']:.3f}; lungs {s['lung_fraction']:.3f} vs "
          f"{r['lung_fraction']:.3f} (volume fractions); HU distance to the real scans {s['hu_w1']:.0f} HU "
          f"(real among themselves {r['hu_w1']:.0f})",
        f"mask adherence: nodule contrast {s['nodule_contrast_hu'] or 0:.0f} HU vs {r['nodule_contrast_hu'] or 0:.0f} HU "
        f"in real scans (mean HU in the mask minus a 2-voxel shell around it), contrast-to-noise "
        f"{s['nodule_cnr'] or 0:.2f} vs {r['nodule_cnr'] or 0:.2f}"]
    atomic_write_text(out, json.dumps(res, indent=1))
    return res


def run_demo(out: Path, cfg: Config, force: bool = False) -> Path:
    """data (phantom -> validate -> picture) -> train (tiny DDPM through DeepSpeed) -> sample
    (relocated masks, DDIM) -> publish (provenance gate, audit, NIfTI + DICOM) -> evaluate (nnU-Net
    on the released synthetic data against the phantom's real split, targeted loop included)."""
    from medsyn_site.sitekey import load_site_key
    from medsyn_site.diffusion.sample import sample_cohort
    from medsyn_site.diffusion.train import train
    from medsyn_site.evaluate.pipeline import run_all
    from medsyn_site.publish.release import publish
    from medsyn_site.targeted import answer_request

    refuse_existing(out, force)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    cohort = out / "phantom"
    _say(1, f"building {cfg.data.phantom.cases} phantom cases in {cohort}")
    write_phantom_cohort(cfg.data.phantom, cfg.data.split, cohort, force=True)
    problems = validate_cohort(cohort, tuple(cfg.data.hu_range))
    if problems:
        raise CohortError("; ".join(map(str, problems)))
    _say(1, f"cohort valid; picture: {show_cohort(cohort, out / 'phantom.png')}")

    run = out / "run"
    _say(2, f"training the {cfg.name} DDPM for {cfg.train.steps} steps in {run}")
    weights = train(cfg, cohort, run, force=True)
    _say(2, f"EMA weights {weights}; metrics {run / 'metrics.csv'}; previews {run / 'previews'}")

    synth, key = out / "synthetic", out / "site.key"
    load_site_key(key, create=True)  # the demo's own key (a site's comes from its first `data prepare`)
    sc = cfg.sample
    _say(3, f"sampling whole volumes from relocated train masks ({sc.sampler} {sc.steps} steps, network on "
            f"{'windows of the training patch' if sc.window == 'patch' else 'the whole volume'}) into {synth}")
    sample_cohort(run, f"relocate:{cohort}", synth, per_mask=sc.per_mask, sampler=sc.sampler, steps=sc.steps,
                  seed=0, force=True, site_key=key, window=sc.window, window_overlap=sc.window_overlap)
    _say(3, f"picture: {show_cohort(synth, out / 'synthetic.png')}")
    numbers = quality_report(cohort, synth, out / "quality.json")
    for line in numbers["lines"]:
        _say(3, line)

    release = out / "release"
    report = publish(synth, cohort, release, fmt="both", force=True, site_key=key, realism=cfg.publish.realism)
    n_out = sum(not c["reasons"] for c in report["cases"])
    _say(4, f"released {n_out}/{len(report['cases'])} synthetic cases to {release} (card, audit, NIfTI, DICOM)")
    for line in (report["realism"] or {}).get("lines", []):
        _say(4, line)

    ev, ws = cfg.evaluate, out / "evaluation"
    if ws.exists():
        shutil.rmtree(ws)
    _say(5, f"nnU-Net ({ev.configuration}, {ev.trainer}) on real / synthetic / real+synthetic / real+targeted, "
            f"{ev.seeds} training(s) each, in {ws}")
    site = functools.partial(answer_request, run=run, out=out / "targeted", training_cohort=cohort, request_cohort=cohort,
                             sampler=sc.sampler, steps=sc.steps, site_key=key, window=sc.window,
                             window_overlap=sc.window_overlap)  # the site answers the request
    run_all(cohort, release / "nifti", ws, seeds=ev.seeds, trainer=ev.trainer, epochs=ev.epochs,
            iterations=ev.iterations, device=ev.device, configuration=ev.configuration, site=site,
            per_mask=sc.per_mask, mirroring=ev.mirroring, jobs=ev.jobs, batch_size=ev.batch_size)
    _say(5, f"report: {ws / 'report' / 'report.md'} (figures beside it)")
    progress.info(f"demo finished: {out}")
    return out
