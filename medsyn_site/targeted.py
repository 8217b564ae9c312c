"""The site's side of the targeted loop: a request (medsyn_site/request.py) comes in, the site samples
from it (``medsyn sample --masks request:FILE``) and publishes the samples through the same gate as
any other (``medsyn publish``: provenance, memorization audit, verbatim masks only with the flag).
Only the release goes back. ``medsyn evaluate run`` and ``medsyn demo`` play the site with this, so
the central evaluator (medsyn_site/evaluate/) never imports the generator."""
from __future__ import annotations

import json
from pathlib import Path

from medsyn_site import provenance, request
from medsyn_site.config import SAMPLE
from medsyn_site.errors import MedsynError
from medsyn_site.progress import log as progress
from medsyn_site.sitekey import DEFAULT_SITE_KEY


def recorded_training_cohort(run: str | Path) -> Path:
    """The cohort a run was trained on, as `medsyn train` recorded it (RUN/training_cohort.json)."""
    f = Path(run) / provenance.COHORT_FILE
    if not f.is_file():
        raise MedsynError(f"{f}: missing; give the run's training cohort (--training-cohort)")
    return Path(json.loads(f.read_text())["cohort"])


def answer_request(request_file: str | Path, run: str | Path, out: str | Path,
                   training_cohort: str | Path | None = None, request_cohort: str | Path | None = None,
                   sampler: str = SAMPLE.sampler, steps: int = SAMPLE.steps, seed: int = 0, site_key: Path = DEFAULT_SITE_KEY,
                   allow_verbatim: bool = False, window: str = SAMPLE.window,
                   window_overlap: float = SAMPLE.window_overlap) -> Path:
    """Sample OUT/synthetic from the request with the run's weights, publish it to OUT/release
    against the run's training cohort; returns the release's NIfTI cohort (what the central side
    trains on). Refused cases stay at the site; the log says which and why."""
    from medsyn_site.diffusion.sample import sample_cohort
    from medsyn_site.publish.release import publish

    out = Path(out)
    req = request.read(request_file)
    training_cohort = Path(training_cohort) if training_cohort else recorded_training_cohort(run)
    request_cohort = request_cohort or training_cohort  # the site's choice, never the request's (request.py)
    progress.info(f"[site] request {request_file}: {len(req.cases)} case(s) x {req.per_mask}, {req.mask_mode} masks "
               f"({req.reason or 'no reason given'})")
    synth = sample_cohort(run, f"request:{request_file}", out / "synthetic", sampler=sampler, steps=steps, seed=seed,
                          force=True, site_key=site_key, request_cohort=request_cohort, window=window,
                          window_overlap=window_overlap)
    report = publish(synth, training_cohort, out / "release", fmt="nifti", force=True, site_key=site_key,
                     allow_verbatim=allow_verbatim)
    cases = report["cases"]
    for c in cases:
        s = c.get("scores") or {}
        verdict = "released" if not c["reasons"] else "REFUSED (" + "; ".join(c["reasons"]) + ")"
        progress.info(f"[site] publish {c['case']}: {verdict}; audit nearest training scan {s.get('nearest', '-')}, "
                   f"global {s.get('global', float('nan')):.3f}, local {s.get('local', float('nan')):.3f}")
    n = sum(not c["reasons"] for c in cases)
    progress.info(f"[site] published {n}/{len(cases)} targeted case(s) through `medsyn publish` to {out / 'release'}")
    return out / "release" / "nifti"
