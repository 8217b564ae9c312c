"""Realism a classifier cannot tell? Every measure of medsyn_site/realism.py for generators on the
phantom at the demo's size, each beside the same measure between two real phantom sets.

  real-vs-real   6 held-out phantom scans (seed 7) against 6 others (seed 8): the baseline
  MODEL          6 whole volumes sampled (the toolkit's default sampler unless --sampler or @SAMPLER:STEPS)
                 from the seed-7 scans' masks, relocated as `medsyn sample --masks relocate:` does,
                 against those 6 real scans
  nodules        contrast by nodule type on 48 more held-out scans (seed 9; baseline seed 10) and 48
                 volumes per model sampled from their masks (nodules.json; --nodules 0 skips it)
  audit          with --audit-cohort DIR (the cohort the models trained on): publish's memorization
                 audit of those 48 samples per model (audit.json)

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
from scipy import ndimage  # noqa: E402

import quality as quality_bench  # noqa: E402  (benchmarks/quality.py: the same relocated-mask sampling)
from medsyn_site import realism  # noqa: E402
from medsyn_site.config import SAMPLE, SplitConfig, load_config  # noqa: E402
from medsyn_site.data.cohort import Cohort  # noqa: E402
from medsyn_site.data.phantom import write_phantom_cohort  # noqa: E402
from medsyn_site.data.show import LUNG_WINDOW  # noqa: E402
from medsyn_site.diffusion.rundir import training_scale  # noqa: E402
from medsyn_site.targeted import recorded_training_cohort  # noqa: E402

ALL_TRAIN = SplitConfig(train=1.0, val=0.0)
SOFT_WINDOW = (-160, 240)  # soft-tissue window (level 40, width 400)
BASELINE = "real-vs-real"


def cohorts(out: Path) -> dict[str, Path]:
    """The training phantoms (16, seed 0: what the shipped model saw) and two held-out real sets."""
    ph = load_config(None).data.phantom
    paths = {"cohort": (16, 0), "heldout": (6, 7), "heldout2": (6, 8), "nodules": (48, 9), "nodules2": (48, 10)}
    for name, (cases, seed) in paths.items():
        if not (out / name / "cohort.json").exists():
            write_phantom_cohort(ph.model_copy(update={"cases": cases, "seed": seed}), ALL_TRAIN, out / name, force=True)
    return {name: out / name for name in paths}


def evaluation(spec: str) -> dict:
    """Sampler keywords of a WINDOW spec: whole, patch (the toolkit's overlap) or patch/OVERLAP."""
    window, _, overlap = spec.partition("/")
    return {"window": window} | ({"overlap": float(overlap)} if overlap else {})


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


def nodule_stage(out: Path, paths: dict, models: dict[str, tuple[Path, str, int, str]], n: int, seed: int = 0,
                 in_place: bool = False) -> dict:
    """Nodule contrast by type on enough nodules to mean something: 48 held-out phantoms (seed 9) as the
    real set, 48 others (seed 10) as the baseline, and per model N volumes sampled from the first set's
    masks relocated (each nodule typed by its conditioning codes, so no voxel-count guessing). Ratios:
    mean contrast of a type / the real set's, with a 95 % bootstrap interval over nodules.
    ``in_place``: sampled from those masks verbatim (labels "MODEL in place"), so every synthetic
    nodule sits where its real one does. The pleura's partial volume raises a faint nodule's mean HU
    (on the real set, ground-glass nodules touching the pleura show 194 HU of contrast, interior ones
    108), so each entry also gives the share of a type's nodules that touch the pleura in the real
    set and in the samples ("pleural_real", "pleural"); relocation keeps each nodule's contact."""
    import SimpleITK as sitk

    from medsyn_site.diffusion.masks import mask_jobs
    from medsyn_site.diffusion.sample import Sampler

    res_file = out / "nodules.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    real_vols = realism.cohort_volumes(paths["nodules"])
    real, real_pleural = realism.contrasts_by_type(real_vols), realism.pleural_by_type(real_vols)

    def entry(vols: list) -> dict:
        got, pleural = realism.contrasts_by_type(vols), realism.pleural_by_type(vols)
        rng = np.random.default_rng(seed)
        e = {}
        for t in realism.NODULE_TYPES:
            a, b = np.array(real.get(t, [])), np.array(got.get(t, []))
            if len(a) and len(b):
                boot = [rng.choice(b, len(b)).mean() / rng.choice(a, len(a)).mean() for _ in range(2000)]
                pa, pb = np.array(real_pleural[t]), np.array(pleural[t])
                e[t] = {"real_hu": round(float(a.mean()), 1), "hu": round(float(b.mean()), 1), "n_real": len(a),
                        "n": len(b), "ratio": round(float(b.mean() / a.mean()), 3),
                        "ci95": [round(float(q), 3) for q in np.percentile(boot, [2.5, 97.5])],
                        "pleural_real": round(float(pa.mean()), 2), "pleural": round(float(pb.mean()), 2),
                        # mean contrast (real, synthetic) and counts of the nodules touching the pleura or not
                        "by_contact": {where: {"real_hu": round(float(a[pa == touch].mean()), 1) if (pa == touch).any() else None,
                                               "hu": round(float(b[pb == touch].mean()), 1) if (pb == touch).any() else None,
                                               "n_real": int((pa == touch).sum()), "n": int((pb == touch).sum())}
                                       for where, touch in (("interior", False), ("pleural", True))}}
        return e
    if BASELINE not in results:
        results[BASELINE] = entry(realism.cohort_volumes(paths["nodules2"]))
    for label, (weights, sampler, steps, window) in models.items():
        label = f"{label} in place" if in_place else label
        if label in results:
            continue
        jobs = mask_jobs(f"{'cohort' if in_place else 'relocate'}:{paths['nodules']}", 1)[:n]
        saved = out / "samples" / f"{label}-nodules.npz"
        vols, codes, t0 = [], [], time.perf_counter()
        if saved.exists():  # sampled before (e.g. before a measure was added): measured again as they are
            z, spacing = np.load(saved), jobs[0].cohort.case(jobs[0].source_id).spacing
            vols = [realism.Volume(hu, None, spacing, codes=c) for hu, c in zip(z["hu"], z["codes"])]
            results[label] = entry(vols)
            res_file.write_text(json.dumps(results, indent=1))
            continue
        gen = Sampler(weights, sampler, steps, device="cpu", **evaluation(window))
        for i, j in enumerate(jobs):
            c = j.conditioning(0)
            hu = sitk.GetArrayFromImage(gen.volumes([c.mask], [2000 + i], [c.codes])[0])
            vols.append(realism.Volume(hu, None, c.mask.GetSpacing(), codes=c.codes))
            codes.append(c.codes)
        np.savez_compressed(saved, hu=np.rint([v.hu for v in vols]).astype(np.int16), codes=np.stack(codes))
        results[label] = entry(vols) | {"seconds_per_volume": round((time.perf_counter() - t0) / len(jobs), 1)}
        res_file.write_text(json.dumps(results, indent=1))
    nodule_figure(out, paths, [m for m in results if m != BASELINE and m.endswith(" in place") == in_place],
                  "nodules_in_place.png" if in_place else "nodules.png")
    for label, e in results.items():
        print("nodules", label, {t: (v["ratio"], v["ci95"], v["n"], v.get("pleural"),
                                     {w: (c["hu"], c["real_hu"]) for w, c in v.get("by_contact", {}).items()})
                                 for t, v in e.items() if isinstance(v, dict)},
              flush=True)
    return results


def audit_stage(out: Path, paths: dict, labels: list[str], training_cohort: Path) -> dict:
    """``medsyn publish``'s memorization audit (tiny.yaml's ``publish.audit``) on each model's nodule-stage
    samples, against the train split of the cohort the model was trained on. cohort48 holds training
    scans only, so the 12 held-out real scans (heldout, heldout2) join the calibration's unseen scans."""
    from tqdm import tqdm

    from medsyn_site.publish import audit

    res_file = out / "audit.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    todo = [lab for lab in labels if lab not in results and (out / "samples" / f"{lab}-nodules.npz").exists()]
    if todo:
        p = load_config(None).publish.audit
        bank, null, _ = audit.training_bank(Cohort(training_cohort), p, tqdm,
                                            unseen=(Cohort(paths["heldout"]), Cohort(paths["heldout2"])))
        cal = audit.calibrate(null, p)
        spacing = Cohort(paths["nodules"]).cases[0].spacing
        for label in todo:
            hu = np.load(out / "samples" / f"{label}-nodules.npz")["hu"]
            scores = audit.nearest_many([(audit.Features.of(v, spacing, p), None) for v in hu], bank,
                                        progress=tqdm, desc=f"audit: {label}")
            results[label] = {
                "samples": len(scores), "training_cohort": str(training_cohort), "null_n": len(null),
                "flagged": [i for i, s in enumerate(scores) if audit.flagged(s, cal)],
                **{k: {"threshold": round(cal[k]["threshold"], 3), "null_max": round(cal[k]["null_max"], 3),
                       "max": round(max(s[k] for s in scores), 3), "mean": round(float(np.mean([s[k] for s in scores])), 3)}
                   for k in ("global", "local")}}
            res_file.write_text(json.dumps(results, indent=1))
    for label in labels:
        if label in results:
            print("audit", label, json.dumps(results[label]), flush=True)
    return results


DENOISE_T = (20, 100, 250, 400, 550, 700, 850, 980)  # training timesteps (of 1000) the held-out loss is read at


def network_inputs(gen, hu: np.ndarray, codes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A real scan as ``gen``'s network sees it (a batch of one): the scan in [-1, 1] padded with air to
    the network's multiple, its mask channel and the whole-volume coordinate grid."""
    from medsyn_site.diffusion.model import coordinate_grid, hu_to_unit, mask_channel, padding

    padded, pad = padding(hu.shape, gen.model_cfg.multiple)
    x0 = torch.nn.functional.pad(hu_to_unit(torch.from_numpy(hu), gen.diffusion.hu_window)[None, None], pad, value=-1.0)
    m = torch.nn.functional.pad(mask_channel(codes[None], gen.model_cfg.mask_levels())[:, None], pad)
    return x0, m, coordinate_grid(padded, (0, 0, 0), hu.shape)[None]


@torch.no_grad()
def denoising_stage(out: Path, paths: dict, real: list, models: dict[str, tuple[Path, str, int, str]], seed: int = 0) -> dict:
    """Held-out denoising error by noise level: each model's x0 estimate (from its v or epsilon
    prediction, the network evaluated as sampling evaluates it: on windows or the whole volume) for the 6 held-out real scans noised at DENOISE_T with fixed
    noise, as RMSE in HU over the body, the lung cavity, and the lung parenchyma (the cavity 2 voxels
    away from anything above -700 HU: vessels, partial-volume ones too, and nodules; ~1,500 voxels a
    scan, 33 HU of spread). The phantom's parenchyma is Gaussian texture (phantom.py: LUNG_TEXTURE plus
    scanner noise), so the best possible denoiser there is the Wiener filter: its RMSE ("Wiener floor")
    is the floor for that region (near-exact: the region is chosen on the clean scan)."""
    from medsyn_site.diffusion.masks import mask_jobs
    from medsyn_site.diffusion.model import network_input, predicted_x0, scheduler, unit_to_hu
    from medsyn_site.diffusion.sample import Sampler

    res_file = out / "denoising.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    jobs = [j.conditioning(0) for j in mask_jobs(f"cohort:{paths['heldout']}", 1)]  # real: its volumes
    for label, (weights, _, _, window) in models.items():
        if label in results:
            continue
        gen = Sampler(weights, device="cpu", **evaluation(window))
        sched, hu_window = scheduler(gen.diffusion), gen.diffusion.hu_window
        rows = {t: {"body": [], "lung": [], "parenchyma": []} for t in DENOISE_T}
        for i, (c, v) in enumerate(zip(jobs, real)):
            assert np.array_equal(c.codes > 0, v.mask), "held-out masks and scans out of order"
            shape = v.hu.shape
            parenchyma = v.cavity & ~ndimage.binary_dilation((v.hu > -700) | v.mask, iterations=2)
            x0, m, coords = network_inputs(gen, v.hu, c.codes)
            for t in DENOISE_T:
                g = torch.Generator().manual_seed(seed * 7919 + i * 1000 + t)
                noise = torch.randn(x0.shape, generator=g)
                tt = torch.tensor([t])
                noisy = sched.add_noise(original_samples=x0, noise=noise, timesteps=tt)
                pred = gen.model(network_input(noisy, m, coords), timesteps=tt)
                est = predicted_x0(pred, noisy, sched.alphas_cumprod[tt].view(-1, 1, 1, 1, 1), gen.diffusion.prediction_type)
                err = (unit_to_hu(est, hu_window) - unit_to_hu(x0, hu_window))[0, 0, : shape[0], : shape[1], : shape[2]].numpy()
                rows[t]["body"].append(float(np.mean(err[v.body] ** 2)))
                rows[t]["lung"].append(float(np.mean(err[v.cavity] ** 2)))
                rows[t]["parenchyma"].append(float(np.mean(err[parenchyma] ** 2)))
        results[label] = {str(t): {r: round(float(np.sqrt(np.mean(e[r]))), 1) for r in e} for t, e in rows.items()}
        res_file.write_text(json.dumps(results, indent=1))
    if "Wiener floor" not in results:
        results["Wiener floor"] = wiener_floor(scheduler(load_config(None).diffusion))
        res_file.write_text(json.dumps(results, indent=1))
    for label in ["Wiener floor", *models]:
        print("denoising RMSE HU (body / lung / parenchyma) by t:", label,
              " ".join(f"{t}:" + "/".join(str(x) for x in results[label][str(t)].values()) for t in DENOISE_T))
    return results


def wiener_floor(sched, n: int = 24, seed: int = 0) -> dict:
    """The least RMSE (HU) any denoiser reaches on the phantom's lung parenchyma at each DENOISE_T:
    the Wiener filter of its Gaussian texture (phantom.py's two smooth-noise terms, their power
    spectrum averaged over n draws of a whole volume), per frequency P s2 / (P + s2), s2 the noise
    variance in HU of the [-1, 1] window at t."""
    from medsyn_site.data.phantom import LUNG_TEXTURE, NOISE_SIGMA_VOX, _smooth_noise

    cfg = load_config(None)
    ph = cfg.data.phantom
    shape, rng = tuple(ph.shape[::-1]), np.random.default_rng(seed)
    draws = [_smooth_noise(rng, shape, *LUNG_TEXTURE) + _smooth_noise(rng, shape, NOISE_SIGMA_VOX, ph.noise_hu) for _ in range(n)]
    power = np.mean([np.abs(np.fft.fftn(x)) ** 2 for x in draws], 0) / np.prod(shape)
    lo, hi = cfg.diffusion.hu_window
    out = {}
    for t in DENOISE_T:
        abar = float(sched.alphas_cumprod[t])
        s2 = (1 - abar) / abar * ((hi - lo) / 2) ** 2
        out[str(t)] = {"parenchyma": round(float(np.sqrt(np.mean(power * s2 / (power + s2)))), 1)}
    return out


def nodule_figure(out: Path, paths: dict, labels: list[str], name: str = "nodules.png", per_type: int = 3,
                  half: int = 10) -> None:
    """The largest nodules of each type, real and each model's (the same shapes, relocated or in place): an axial
    crop through each one's centre, lung window."""
    from medsyn_site.data.cohort import Cohort
    from medsyn_site.imaging import component_types, nodule_codes

    c = Cohort(paths["nodules"])
    real = [(a[0], nodule_codes(a[1], rec.nodules)) for rec in c.cases for a in [c.arrays(rec.id)]]
    rows = [("real", real)] + [(lab, list(zip(d["hu"], d["codes"]))) for lab in labels
                               if (out / "samples" / f"{lab}-nodules.npz").exists()
                               for d in [np.load(out / "samples" / f"{lab}-nodules.npz")]]
    fig, axes = plt.subplots(len(rows), 3 * per_type, figsize=(1.3 * 3 * per_type, 1.45 * len(rows)), squeeze=False)
    for ax_row, (label, vols) in zip(axes, rows):
        found = []  # (type, voxels, hu crop)
        for hu, cd in vols:
            lab, kinds = component_types(cd)
            for i, kind in enumerate(kinds, start=1):
                comp = lab == i
                z, y, x = np.argwhere(comp).mean(0).round().astype(int)
                pad = np.pad(hu[z].astype(np.float32), half, constant_values=-1024)
                found.append((kind, int(comp.sum()), pad[y:y + 2 * half, x:x + 2 * half]))
        for t_i, t in enumerate(realism.NODULE_TYPES):
            best = sorted([f for f in found if f[0] == t], key=lambda f: -f[1])[:per_type]
            for k in range(per_type):
                ax = ax_row[t_i * per_type + k]
                ax.axis("off")
                if k < len(best):
                    ax.imshow(best[k][2], cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1])
                    ax.set_title(f"{label}: {t} ({best[k][1]} vx)", fontsize=5)
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)


WALL_BINS = ((-1100, -200, "< -200"), (-200, -50, "fat"), (-50, 100, "soft"), (100, 300, "100-300"), (300, 4000, "> 300"))


def wall_table(sets: dict[str, list]) -> str:
    """Where the body wall's HU distance comes from: percentiles of the wall's HU (``body & ~cavity``,
    pooled over a set's volumes), the shares of its voxels in tissue ranges, and the mean lung cavity."""
    head = "| body wall | HU 10th / 25th / 50th pct. | " + " / ".join(n for _, _, n in WALL_BINS) + " | cavity voxels |"
    rows = [head, "|---|---|---|---|"]
    for name, vols in sets.items():
        w = np.concatenate([v.hu[v.body & ~v.cavity] for v in vols]).astype(np.float32)
        pct = " / ".join(f"{q:.0f}" for q in np.percentile(w, [10, 25, 50]))
        shares = " / ".join(f"{((w >= a) & (w < b)).mean():.3f}" for a, b, _ in WALL_BINS)
        rows.append(f"| {name} | {pct} | {shares} | {np.mean([v.cavity.sum() for v in vols]):.0f} |")
    return "\n".join(rows)


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
    for label in [BASELINE, *sets]:  # the curves of this run's models
        c = results[label]["cnn_c2st"]["curves"][0]
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
                    help="LABEL=WEIGHTS (an ema.pt or a pretrained .pt), optionally @SAMPLER:STEPS[:WINDOW] (default "
                         "--sampler; WINDOW: the network evaluated on windows of its training patch (patch, or "
                         "patch/OVERLAP) or on the whole volume at once (whole); default the toolkit's)")
    ap.add_argument("--sampler", default=f"{SAMPLE.sampler}:{SAMPLE.steps}:{SAMPLE.window}", help="the toolkit's default")
    ap.add_argument("--nodules", type=int, default=48, help="volumes of the per-type nodule contrast stage (0: skip)")
    ap.add_argument("--nodules-in-place", action="store_true",
                    help="the nodule stage also from the real masks verbatim (every nodule where its real one is)")
    ap.add_argument("--denoising", action="store_true",
                    help="each model's held-out denoising error by noise level (denoising.json)")
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--cnn-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pair", action="append", default=[], metavar="LABEL=REAL:SYNTHETIC",
                    help="an existing synthetic cohort against its real cohort's train split (types by voxel "
                         "count), beside the real test split against the same (LABEL real-vs-real)")
    ap.add_argument("--audit-cohort", type=Path, metavar="DIR",
                    help="the cohort the models were trained on: publish's memorization audit of their nodule-stage samples")
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
    specs = {}  # label -> (weights, sampler, steps, window)
    for spec in a.model:
        label, _, weights = spec.partition("=")
        weights, _, how = weights.partition("@")
        sampler, steps, *window = (how or a.sampler).split(":")
        specs[label] = (Path(weights), sampler, int(steps), window[0] if window else SAMPLE.window)
    for label, (weights, sampler, steps, window) in specs.items():
        npz = out / "samples" / f"{label}.npz"
        if not npz.exists():
            vols, sec = quality_bench.sample(weights, paths["heldout"], a.samples, sampler, steps, **evaluation(window))
            hu, mask = np.stack([v for v, _ in vols]), np.stack([m for _, m in vols])
            np.savez_compressed(npz, hu=hu, mask=mask)
            made[label] = {"weights": str(weights), "sampler": f"{sampler}:{steps}:{window}", "seconds_per_volume": round(sec, 1),
                           "samples": len(vols)}
            (out / "models.json").write_text(json.dumps(made, indent=1))
        d = np.load(npz)
        sets[label] = [realism.Volume(h, m, real[0].spacing, types) for h, m in zip(d["hu"], d["mask"])]
        measure(out, label, real, sets[label], a.cnn_steps, made.get(label))
    if a.denoising:
        denoising_stage(out, paths, real, specs)
    if a.nodules:
        nodule_stage(out, paths, specs, a.nodules)
        if a.nodules_in_place:
            nodule_stage(out, paths, specs, a.nodules, in_place=True)
        if a.audit_cohort:
            audit_stage(out, paths, list(specs), a.audit_cohort)
    for spec in a.pair:  # e.g. the utility benchmark's task: its real cohort and its generator's samples
        label, _, pair = spec.partition("=")
        real_root, _, synth_root = pair.partition(":")
        train = realism.cohort_volumes(real_root, "train")
        measure(out, f"{label} real-vs-real", train, realism.cohort_volumes(real_root, "test"), a.cnn_steps)
        measure(out, label, train, realism.cohort_volumes(synth_root, types=realism.nodule_types(train)), a.cnn_steps)
    results = json.loads((out / "results.json").read_text())
    if sets:
        figures(out, real, sets)
        walls = wall_table({"real (held out)": real, "real, second set": realism.cohort_volumes(paths["heldout2"])} | sets)
        (out / "table_wall.md").write_text(walls + "\n")
        print(walls)
    (out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    if a.export:
        label, dest = a.export
        blob = torch.load(made[label]["weights"], map_location="cpu")
        run_config = Path(made[label]["weights"]).parents[2] / "config.yaml"  # RUN/checkpoints/step_N/ema.pt
        if "patch_size" not in blob and run_config.is_file():  # weights from before they recorded it
            blob["patch_size"] = list(load_config(run_config).train.patch_size)
        if not blob.get("scale") and run_config.is_file():  # weights from before they recorded the training scale
            blob["scale"] = training_scale(Cohort(recorded_training_cohort(run_config.parent)).split("train"))
        blob["made_by"] = (f"medsyn train with benchmarks/configs/ ({label}, training step {blob.get('step')}); "
                           f"measured by benchmarks/realism.py --out {a.out}")
        torch.save(blob, dest)
        print("exported", made[label]["weights"], "->", dest)


if __name__ == "__main__":
    main()
