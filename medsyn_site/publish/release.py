"""``medsyn publish``: the gate through which only synthetic data leaves the site.

1. Provenance: a case is released only if cohort.json, a provenance entry signed with the site key,
   and the files' sha256 all agree; files nobody vouches for are refused.
2. Memorization audit (publish/audit.py), calibrated on held-out real scans; flagged cases are
   refused unless overridden with a written reason, which the audit records.
3. Verbatim real masks are refused unless --allow-verbatim-masks (recorded in the card).
The release (built aside, renamed into place) holds the synthetic files (NIfTI and/or DICOM CT+SEG),
the dataset card and the audit, nothing else. Each synthetic volume is decoded once (``case_pass``):
the bytes hashed against provenance are the ones audited, scored and written out.
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from medsyn_site import __version__, provenance
from medsyn_site.atomic import atomic_write_text, refuse_existing, sha256_file, staged_dir
from medsyn_site.config import RealismConfig
from medsyn_site.data.cohort import Cohort, image_path, mask_path, write_case_files, write_index
from medsyn_site.errors import MedsynError
from medsyn_site.publish import audit
from medsyn_site.sitekey import DEFAULT_SITE_KEY, load_site_key

log = logging.getLogger(__name__)


class ReleaseError(MedsynError):
    """Nothing can be released as asked."""


@dataclass
class Decision:
    case: str
    released: bool = False
    reasons: list[str] = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    override: str | None = None
    adherence: dict = field(default_factory=dict)


def hash_problems(synth: Path, case: str, entry: dict) -> list[str]:
    """The case's files whose sha256 differs from its provenance entry."""
    return [f"{path.parent.name}/{path.name}: sha256 differs from provenance (changed after sampling)"
            for key_, path in (("image_sha256", image_path(synth, case)), ("mask_sha256", mask_path(synth, case)))
            if sha256_file(path) != entry[key_]]


def check_provenance(synth: Path, key: bytes, allow_verbatim: bool, key_path: Path | str = "the site key"
                     ) -> tuple[dict, dict[str, Decision], dict]:
    """Per case: does it pass the provenance gate? Also lists stray files. Returns (header, decisions, entries)."""
    header, entries = provenance.read(synth)
    by_case = {}
    decisions: dict[str, Decision] = {}
    cohort = Cohort(synth)
    for e in entries:
        if provenance.verify(e, header, key):
            by_case[e.get("case")] = e
    if entries and not by_case:
        raise provenance.ProvenanceError(
            f"{synth / provenance.FILE}: no entry verifies with {key_path}: wrong site key? (publish with the "
            "--site-key that `medsyn sample` signed with)")
    for rec in cohort.cases:
        d = decisions.setdefault(rec.id, Decision(rec.id))
        e = by_case.get(rec.id)
        if rec.source != "synthetic":
            d.reasons.append(f"cohort.json marks it {rec.source}")
        if e is None:
            d.reasons.append("no provenance entry signed with this site's key")
            continue
        for path in (image_path(synth, rec.id), mask_path(synth, rec.id)):
            if not path.is_file():
                d.reasons.append(f"{path.name}: missing")
        if not d.reasons:
            d.reasons += hash_problems(synth, rec.id, e)
        if e.get("mask_mode") == "verbatim" and not allow_verbatim:
            d.reasons.append("conditioned on a verbatim real mask (pass --allow-verbatim-masks to publish it)")
    listed = {r.id for r in cohort.cases}
    for sub in ("images", "masks"):
        for f in sorted((synth / sub).glob("*")):
            cid = f.name.removesuffix(".nii.gz")
            if cid not in listed:
                decisions.setdefault(cid, Decision(cid)).reasons.append(f"{sub}/{f.name}: not in cohort.json")
    return header, decisions, by_case


def _release_geometry(image: sitk.Image) -> sitk.Image:
    """Origin reset to the volume centre: the scanner's table position is not published."""
    out = sitk.Image(image)
    size, sp = np.array(image.GetSize()), np.array(image.GetSpacing())
    d = np.array(image.GetDirection()).reshape(3, 3)
    out.SetOrigin(tuple(-(d @ ((size - 1) * sp / 2))))
    return out


# -- the single pass over the synthetic volumes ----------------------------------------------------

@dataclass(frozen=True)
class CaseJob:
    """One synthetic case's pass (run in an audit worker, beside its copy of the training bank)."""

    root: str
    case: str
    entry: dict  # its verified provenance entry (the files' sha256)
    params: audit.AuditParams
    stage: str  # the release being built
    fmt: str
    segmenter: str | None
    keep: bool  # hand the volume back (the realism subset)


@functools.lru_cache(maxsize=2)
def _segmenter(path: str | None):
    from medsyn_site.publish import adherence

    return adherence.Segmenter(path) if path else None


def case_pass(job: CaseJob, bank: audit.Bank) -> dict:
    """Each synthetic volume is decoded once, here: its files are checked against their provenance
    hashes, scored by the memorization audit and for mask adherence, and written to the release being
    built (NIfTI and/or DICOM); ``discard`` removes them if the case is then refused. Returns reasons,
    scores, adherence, the NIfTI record and (``keep``) the volume."""
    from medsyn_site.publish import adherence

    root = Path(job.root)
    reasons = hash_problems(root, job.case, job.entry)
    if reasons:
        return {"reasons": reasons}
    cohort = Cohort(root)
    image, mask = cohort.read(job.case)
    hu, m = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mask)
    out = {"reasons": [], "scores": audit.nearest(audit.Features.of(hu, image.GetSpacing(), job.params), bank),
           "adherence": adherence.score(hu, m, _segmenter(job.segmenter)), "record": None,
           "volume": (hu, m) if job.keep else None}
    image, mask = _release_geometry(image), _release_geometry(mask)
    stage = Path(job.stage)
    if job.fmt in ("nifti", "both"):
        out["record"] = write_case_files(stage / "nifti", job.case, image, mask, patient=job.case, split="train",
                                         source="synthetic", nodules=[n.model_dump() for n in cohort.case(job.case).nodules])
    if job.fmt in ("dicom", "both"):
        from medsyn_site.publish.dicom import write_case

        write_case(image, mask, stage / "dicom" / job.case, job.case)
    return out


def discard(stage: Path, case: str) -> None:
    """A refused case's files, out of the release being built."""
    for path in (image_path(stage / "nifti", case), mask_path(stage / "nifti", case)):
        path.unlink(missing_ok=True)
    shutil.rmtree(stage / "dicom" / case, ignore_errors=True)


def judge(d: Decision, result: dict, calibration: dict, overrides: dict[str, str], min_contrast: float | None,
          min_dice: float | None) -> None:
    """The case's refusals from its pass: changed files, a memorization flag (unless overridden with a
    reason), mask adherence below the thresholds."""
    d.reasons += result["reasons"]
    if d.reasons:
        return
    d.scores, d.adherence = result["scores"], result["adherence"]
    hits = audit.flagged(d.scores, calibration)
    if hits and d.case in overrides:
        d.override = overrides[d.case]
    elif hits:
        d.reasons.append(f"memorization audit: a copy of a training scan ({', '.join(hits)} similarity "
                         f"{max(d.scores[h] for h in hits):.3f} above threshold; nearest training scan "
                         f"{d.scores['nearest']}, disguise {d.scores['disguise']})")
    low, dsc = d.adherence["min_contrast_hu"], d.adherence["segmenter_dice"]
    if min_contrast is not None and low is not None and low < min_contrast:
        d.reasons.append(f"mask adherence: faintest nodule {low:.0f} HU above its surroundings "
                         f"(< --min-contrast {min_contrast:g})")
    if min_dice is not None and dsc is not None and dsc < min_dice:
        d.reasons.append(f"mask adherence: segmenter Dice {dsc:.2f} at the mask (< --min-dice {min_dice:g})")


def adherence_summary(decisions: dict[str, Decision], min_contrast: float | None, min_dice: float | None,
                      segmenter: Path | None) -> dict:
    """The card's mask-adherence section, over every case scored."""
    scored = [d.adherence for d in decisions.values() if d.adherence]
    contrasts = [c for a in scored for c in a["contrast_hu"]]
    dices = [a["segmenter_dice"] for a in scored if a["segmenter_dice"] is not None]
    return {"min_contrast_hu": min_contrast, "min_dice": min_dice,
            "segmenter": str(segmenter) if segmenter else None,
            "nodules": len(contrasts),
            "median_contrast_hu": round(float(np.median(contrasts)), 1) if contrasts else None,
            "mean_segmenter_dice": round(float(np.mean(dices)), 3) if dices else None}


# -- the privacy report ----------------------------------------------------------------------------

def write_privacy_report(folder: Path, report: dict, extra: dict[str, list[dict]] | None = None) -> None:
    """audit/audit.json, audit/privacy.md (per case: nearest training scan, scores, best disguise;
    thresholds and false-alarm estimates) and audit/scores.png (score distributions)."""
    cal = report["calibration"]
    atomic_write_text(folder / "audit.json", json.dumps(report, indent=1, default=audit._jsonable))
    lines = ["# Privacy report (memorization audit)", "",
             f"Thresholds for a {cal['false_alarm_target']:.1%} false-alarm rate per unseen real scan "
             f"(normal fit on Fisher-z nearest-neighbour scores of {cal['null_n']} unseen real scans, + margin "
             f"{cal['margin']}):", "",
             "| score | threshold | false alarm (fit) | 95% CI (bootstrap) | unseen real above | 95% CI (exact) |",
             "|---|---|---|---|---|---|"]
    for k in ("global", "local"):
        c = cal[k]
        lines.append(f"| {k} | {c['threshold']:.3f} | {c['false_alarm_fit']:.2e} | "
                     f"{c['false_alarm_fit_95ci'][0]:.1e} - {c['false_alarm_fit_95ci'][1]:.1e} | "
                     f"{c['null_exceeding']}/{cal['null_n']} | {c['false_alarm_empirical_95ci'][0]:.2f} - "
                     f"{c['false_alarm_empirical_95ci'][1]:.2f} |")
    lines += ["", "| case | released | nearest training scan | global | local | best disguise |", "|---|---|---|---|---|---|"]
    for c in report["cases"]:
        s = c.get("scores") or {}
        dis = s.get("disguise") or {}
        lines.append(f"| {c['case']} | {'yes' if not c['reasons'] else 'NO'} | {s.get('nearest', '-')} | "
                     f"{s.get('global', float('nan')):.3f} | {s.get('local', float('nan')):.3f} | "
                     f"{', '.join(f'{k} {v}' for k, v in dis.items()) or '-'} |")
    atomic_write_text(folder / "privacy.md", "\n".join(lines) + "\n")
    groups = {"unseen real (calibration)": cal["null_scores"],
              "synthetic": [c["scores"] for c in report["cases"] if c.get("scores")], **(extra or {})}
    score_figure(groups, cal, folder / "scores.png")


def score_figure(groups: dict[str, list[dict]], cal: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medsyn_site.atomic import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("global", "local")):
        bins = np.linspace(-0.2, 1.0, 40)
        for name, scores in groups.items():
            ax.hist([s[key] for s in scores], bins=bins, alpha=0.55, label=name)
        ax.axvline(cal[key]["threshold"], color="red", linestyle="--", label=f"threshold {cal[key]['threshold']:.3f}")
        ax.set_xlabel(f"{key} NCC to nearest training scan")
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def _card(header: dict, released: list[Decision], refused: list[Decision], calibration: dict, fmt: str,
          allow_verbatim: bool, licence: str, entries: dict, adherence: dict, realism: dict | None = None
          ) -> tuple[str, dict]:
    card = {
        "name": "medsyn-site synthetic lung CT + nodule masks",
        "software": f"medsyn-site {__version__}",
        "model_sha256": header["checkpoint_sha256"],
        "sampler": header["sampler"], "steps": header["steps"], "seed": header["seed"],
        "window": header.get("window", "whole"),  # provenance from before windows: the whole volume
        "mask_source": header["mask_source"],
        "verbatim_real_masks": allow_verbatim and any(entries[d.case]["mask_mode"] == "verbatim" for d in released),
        "counts": {"released": len(released), "refused": len(refused)},
        "format": fmt,
        "audit": {"thresholds": {k: calibration[k]["threshold"] for k in ("global", "local")},
                  "false_alarm_target": calibration["false_alarm_target"],
                  "overridden": [{"case": d.case, "reason": d.override} for d in released if d.override]},
        "mask_adherence": adherence | {"cases": {d.case: d.adherence for d in released}},
        "realism": realism,
        "licence": licence,
        "provenance": [entries[d.case] for d in released],
        "notes": "Every file is synthetic: generated by a diffusion model from a nodule mask; no real patient "
                 "image is included. Volume origins are reset to the volume centre.",
    }
    md = "\n".join([
        f"# {card['name']}", "",
        f"- software: {card['software']}", f"- model (EMA weights) sha256: `{card['model_sha256']}`",
        f"- sampler: {card['sampler']}, {card['steps']} steps, seed {card['seed']}; network evaluated on "
        + ("the whole volume" if card["window"] == "whole" else f"{'x'.join(map(str, card['window']))} windows"),
        f"- conditioning masks: {card['mask_source']}"
        + (" — INCLUDES VERBATIM REAL MASKS (published with --allow-verbatim-masks)" if card["verbatim_real_masks"] else ""),
        f"- released cases: {len(released)}; refused: {len(refused)}",
        f"- memorization audit thresholds (NCC of lung-interior features over flips, shifts, rotations, scalings; "
        f"calibrated on unseen real scans for a {calibration['false_alarm_target']:.0%} false-alarm rate): "
        f"global {calibration['global']['threshold']:.4f}, local {calibration['local']['threshold']:.4f}; "
        f"overrides: {len(card['audit']['overridden'])} (details: audit/privacy.md)",
        f"- mask adherence (nodule mean HU minus a 2-voxel shell around it): median {adherence['median_contrast_hu']} HU "
        f"over {adherence['nodules']} nodules" + (f", segmenter Dice at the masks {adherence['mean_segmenter_dice']}"
                                                if adherence["mean_segmenter_dice"] is not None else "")
        + (f"; refused below {adherence['min_contrast_hu']:g} HU" if adherence["min_contrast_hu"] is not None else ""),
        *(f"- {line}" for line in (realism["lines"] if realism else
                                   ["realism: not measured (`medsyn publish` measures it; publish.realism in the config)"])),
        f"- format: {fmt}", f"- licence: {licence}", "", card["notes"], ""])
    return md, card


def realism_subset(candidates: list[str], cfg: RealismConfig | None) -> set[str]:
    """The synthetic cases whose volumes the card's realism measures (a fixed random subset of at most
    ``cfg.max_volumes``; the refused among them are left out afterwards)."""
    if cfg is None or not cfg.enabled:
        return set()
    rng = np.random.default_rng(0)
    return set(rng.choice(candidates, cfg.max_volumes, replace=False)) if len(candidates) > cfg.max_volumes \
        else set(candidates)


def measure_realism(synth: dict[str, tuple], cohort: Cohort, training_cohort: str | Path,
                    cfg: RealismConfig | None) -> dict | None:
    """The released volumes' realism (medsyn_site/realism.py; ``synth``: case -> (hu, mask) from the
    single pass) against the training cohort's train scans, with its val scans against the same as the
    real-vs-real baseline (up to ``cfg.max_volumes`` each, a fixed random subset). None when not asked
    for or too few volumes."""
    if cfg is None or not cfg.enabled:
        return None
    from medsyn_site import realism
    from medsyn_site.imaging import nodule_codes

    rng = np.random.default_rng(0)

    def pick(ids: list[str]) -> list[str]:
        return sorted(rng.choice(ids, cfg.max_volumes, replace=False)) if len(ids) > cfg.max_volumes else ids
    real_cohort = Cohort(training_cohort)
    split = {s: pick([c.id for c in real_cohort.cases if c.split == s]) for s in ("train", "val")}
    if len(split["train"]) < 2 or len(synth) < 2:
        log.info("realism not measured: it needs >= 2 released and >= 2 training scans")
        return None

    real = realism.cohort_volumes(training_cohort, only=set(split["train"]))
    other = realism.cohort_volumes(training_cohort, only=set(split["val"])) if len(split["val"]) >= 2 else None
    types = realism.nodule_types(real)
    synth_vols = [realism.Volume(hu, m, tuple(cohort.case(c).spacing), types, nodule_codes(m, cohort.case(c).nodules))
                  for c, (hu, m) in sorted(synth.items())]
    log.info("realism: %d released volumes against %d training scans", len(synth_vols), len(real))
    return realism.summarize(real, synth_vols, other, cnn_steps=cfg.cnn_steps)


def _nothing_released(synth: Path, out, refused: list[Decision], report: dict | None = None) -> ReleaseError:
    e = ReleaseError(f"{synth}: all {len(refused)} case(s) refused ("
                     + "; ".join(f"{d.case}: {', '.join(d.reasons)}" for d in refused[:3])
                     + (", ..." if len(refused) > 3 else "") + f"); nothing written to {out}")
    e.report = report  # the audit's findings (None when refused before the audit)
    return e


def publish(synth: str | Path, training_cohort: str | Path, out: str | Path, fmt: str = "both",
            overrides: dict[str, str] | None = None, allow_verbatim: bool = False, licence: str = "CC-BY-4.0",
            force: bool = False, site_key: Path = DEFAULT_SITE_KEY, min_contrast: float | None = None,
            min_dice: float | None = None, segmenter: Path | None = None, workers: int | None = None,
            audit_params: audit.AuditParams = audit.AuditParams(), realism: RealismConfig | None = None) -> dict:
    """Gate, audit (``audit_params``: the config's ``publish.audit``; on ``workers`` processes, default
    one per core) and write a release; returns the audit report. With ``realism`` (enabled) the card
    also measures the released volumes' realism against the training scans. Each synthetic volume is
    decoded once (``case_pass``)."""
    synth, overrides = Path(synth), overrides or {}
    refuse_existing(out, force)  # before the audit's long work
    if min_dice is not None and segmenter is None:
        raise ReleaseError("--min-dice needs --segmenter (a nodule segmenter trained on real scans)")
    if segmenter is not None:
        _segmenter(str(segmenter))  # a bad weights file is refused before the long work
    key = load_site_key(site_key)
    # the files' hashes twice: here, to refuse changed files before the audit's long work (which
    # caches features in the training cohort), and in case_pass, on the bytes it then audits and releases
    header, decisions, entries = check_provenance(synth, key, allow_verbatim, site_key)
    provenance.check_training_cohort(header, training_cohort, synth)
    if all(d.reasons for d in decisions.values()):  # before the audit, which caches features by the cohort
        raise _nothing_released(synth, out, list(decisions.values()))
    bank, null, cache = audit.training_bank(Cohort(training_cohort), audit_params, progress=tqdm, workers=workers)
    log.info("audit features of %s: %s", training_cohort, cache or "not cached")
    calibration = audit.calibrate(null, audit_params) | {"null_scores": null, "params": audit_params.model_dump()}
    cohort = Cohort(synth)
    todo = [rec.id for rec in cohort.cases if not decisions[rec.id].reasons]
    keep = realism_subset(todo, realism)
    with staged_dir(out, force) as stage:
        jobs = [CaseJob(str(synth), c, entries[c], audit_params, str(stage), fmt,
                        str(segmenter) if segmenter else None, c in keep) for c in todo]
        results = audit.map_with_bank(case_pass, jobs, bank, workers, tqdm, desc=f"audit + release ({fmt})")
        volumes = {}
        for case, result in zip(todo, results):
            d = decisions[case]
            judge(d, result, calibration, overrides, min_contrast, min_dice)
            if d.reasons:
                discard(stage, case)
            elif result.get("volume") is not None:
                volumes[case] = result["volume"]
        released = [d for d in decisions.values() if not d.reasons]
        refused = [d for d in decisions.values() if d.reasons]
        for d in refused:
            log.warning("refused %s: %s", d.case, "; ".join(d.reasons))
        summary = adherence_summary(decisions, min_contrast, min_dice, segmenter)
        report = {"calibration": calibration, "adherence": summary,
                  "cases": [d.__dict__ for d in decisions.values()]}
        if not released:
            raise _nothing_released(synth, out, refused, report)
        if fmt in ("nifti", "both"):
            records = {c: r.get("record") for c, r in zip(todo, results)}
            write_index(stage / "nifti", [records[d.case] for d in released], description="synthetic release")
        report["realism"] = measure_realism(volumes, cohort, training_cohort, realism)
        write_privacy_report(stage / "audit", report)
        md, card = _card(header, released, refused, calibration, fmt, allow_verbatim, licence, entries,
                         summary, report["realism"])
        atomic_write_text(stage / "dataset_card.md", md)
        atomic_write_text(stage / "dataset_card.json", json.dumps(card, indent=1))
    return report
