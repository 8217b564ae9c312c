"""Where along the sampling chain do the synthetic scans part from real ones? Two probes of one model
on the 6 held-out real scans of benchmarks/realism.py (seed 7), each result tested against those
scans with the same CNN and feature two-sample tests and HU distances (medsyn_site/realism.py):

  partial   each real scan noised to timestep T and denoised from there to 0 by the model (ancestral
            DDPM, --stride 10 timesteps a step, or 1: every training step; T=999 is a whole chain):
            the defects made below T (partial.json, keyed by WINDOW:T, or WINDOW:T/STRIDE)
  sampler   whole chains from the same masks in place and the same seeds, one per variant
            SAMPLER:STEPS:WINDOW[:LAMBDA]; WINDOW: whole, patch (the toolkit's overlap) or patch/OVERLAP;
            LAMBDA divides the network's noise estimate (the "epsilon scaling" of Ning et al.,
            ICLR 2024, against exposure bias) (sampler.json)
  seams     whether samples (benchmarks/realism.py's samples/LABEL.npz, one or more) step at the
            window boundaries more than the real scans do at the same planes (printed)

  python benchmarks/realism_chain.py --out benchmarks/out/realism --weights medsyn_site/pretrained/phantom-tiny.pt \\
      --partial 50 150 300 500 999 --window whole
  python benchmarks/realism_chain.py --out benchmarks/out/realism --weights medsyn_site/pretrained/phantom-tiny.pt \\
      --sampler sde-dpm++:10:whole sde-dpm++:10:whole:1.01 sde-dpm++:10:whole:0.99 sde-dpm++:10:patch/0.5 \
      sde-dpm++:10:patch

Each entry is kept in its JSON file and skipped when there (stop and re-run freely). --tag TAG keys
another model's entries TAG/KEY (the keys without a tag are the shipped model's).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

import realism as realism_bench  # noqa: E402  (benchmarks/realism.py: the same cohorts)
from medsyn_site import realism
from medsyn_site.diffusion.masks import mask_jobs
from medsyn_site.diffusion.model import network_input, sampling_scheduler, scheduler, unit_to_hu
from medsyn_site.diffusion.sample import Sampler


class EpsilonScaled(torch.nn.Module):
    """A v-prediction network whose implied noise estimate is divided by ``lam`` (x_t kept)."""

    def __init__(self, net, abar: torch.Tensor, lam: float):
        super().__init__()
        self.net, self.abar, self.lam = net, abar, lam

    def forward(self, x, timesteps, context=None):
        v = self.net(x, timesteps=timesteps)
        a = self.abar[timesteps.long()].view(-1, 1, 1, 1, 1).to(v.dtype)
        xt = x[:, :1]
        eps = ((1 - a).sqrt() * xt + a.sqrt() * v) / self.lam
        x0 = (xt - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def load(res_file: Path) -> dict:
    return json.loads(res_file.read_text()) if res_file.exists() else {}


def tested(real: list, hu: list, extra: dict, cnn_steps: int) -> dict:
    syn = [realism.Volume(h, v.mask, v.spacing, v.types) for h, v in zip(hu, real)]
    cnn, feat = realism.cnn_c2st(real, syn, steps=cnn_steps), realism.feature_c2st(real, syn)
    w1 = {r: round(realism._w1(realism.region_values(real, r), realism.region_values(syn, r)), 1) for r in ("lung", "wall")}
    lung = np.concatenate([v.hu[v.cavity] for v in syn])
    return extra | {"cnn": round(cnn["accuracy"], 3), "cnn_sd": round(cnn["std"], 3),
                    "cnn_train": round(cnn["train_accuracy"], 3), "feat": round(feat["accuracy"], 3),
                    "w1_lung": w1["lung"], "w1_wall": w1["wall"],
                    "lung_p10_50_90": np.percentile(lung, [10, 50, 90]).round(0).tolist()}


def partial_chains(gen: Sampler, real: list, jobs: list, starts: list[int], key: str, res_file: Path,
                   cnn_steps: int, stride: int = 10) -> None:
    results = load(res_file)
    train_s, window = scheduler(gen.diffusion), gen.diffusion.hu_window
    shape = real[0].hu.shape
    x0, m, coords = (torch.cat(t) for t in zip(*(realism_bench.network_inputs(gen, v.hu, c.codes)
                                                   for v, c in zip(real, jobs))))
    for start in starts:
        label = f"{key}:{start}" + (f"/{stride}" if stride != 10 else "")
        if label in results:
            continue
        t0 = time.perf_counter()
        sch = sampling_scheduler(gen.diffusion, "ddpm", gen.diffusion.num_train_timesteps // stride)
        steps = [int(t) for t in sch.timesteps if int(t) <= start]
        torch.manual_seed(start)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(start))
        x = train_s.add_noise(original_samples=x0, noise=noise, timesteps=torch.full((len(real),), steps[0]))
        with torch.no_grad():
            for t in steps:
                x, _ = sch.step(gen.model(network_input(x, m, coords), timesteps=torch.tensor([t])), t, x)
        hu = [unit_to_hu(x[i, 0, : shape[0], : shape[1], : shape[2]], window).numpy() for i in range(len(real))]
        results[label] = tested(real, hu, {"from_t": steps[0], "seconds": round(time.perf_counter() - t0)}, cnn_steps)
        res_file.write_text(json.dumps(results, indent=1))
        print(label, results[label], flush=True)


def plane_step(vols: list, ax: int, k: int) -> float:
    """Mean |HU difference| between planes k and k + 1 of axis ``ax``, over body voxels (nan: none)."""
    steps = []
    for v in vols:
        a, b = np.take(v.hu, k, ax), np.take(v.hu, k + 1, ax)
        steps.append(np.abs(b - a)[np.take(v.body, k, ax) & np.take(v.body, k + 1, ax)])
    steps = np.concatenate(steps)
    return float(steps.mean()) if steps.size else float("nan")


def seams(labels: list[str], real: list, out: Path, window: int = 32, overlap: float = 0.25) -> dict:
    """Do windowed samples show where the windows meet? For each axis, the mean |HU step| between
    neighbouring planes (body voxels) at each window boundary, over its mean 2-4 planes either side:
    ~1 where nothing happens at the boundary; a seam would stand out above the anatomy's own spread,
    which the real scans and the whole-volume samples show at the same planes."""
    from monai.data.utils import dense_patch_slices

    vols = {"real": real}
    for label in labels:
        d = np.load(out / "samples" / f"{label}.npz")
        vols[label] = [realism.Volume(h.astype(np.float32), m > 0, v.spacing, v.types) for h, m, v in zip(d["hu"], d["mask"], real)]
    shape = real[0].hu.shape  # the phantom's padding multiple leaves it whole (48 x 64 x 64)
    step = tuple(max(1, int(window * (1 - overlap))) for _ in shape)
    slices = dense_patch_slices(shape, (window,) * 3, step)
    res = {}
    for name, vs in vols.items():
        ratios = []
        for ax in range(3):
            edges = sorted({int(e) for s in slices for e in (s[ax].start, s[ax].stop)} - {0, shape[ax]})
            prof = np.array([plane_step(vs, ax, k) for k in range(shape[ax] - 1)])
            for e in edges:
                ratios.append(round(float(prof[e - 1] / np.nanmean(np.r_[prof[max(e - 5, 0):e - 2], prof[e + 1:e + 4]])), 3))
        res[name] = ratios
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/realism")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--partial", type=int, nargs="*", default=[], help="start timesteps of the partial chains")
    ap.add_argument("--window", default="whole", choices=["patch", "whole"], help="network evaluation of --partial")
    ap.add_argument("--stride", type=int, default=10, help="timesteps per ancestral step of --partial (1: every one)")
    ap.add_argument("--sampler", nargs="*", default=[], help="SAMPLER:STEPS:WINDOW[:LAMBDA] variants")
    ap.add_argument("--seams", nargs="*", default=[], help="LABELs: window-boundary steps of benchmarks/realism.py's samples/LABEL.npz")
    ap.add_argument("--tag", default="", help="prefix of the result keys (TAG/KEY): another model than the shipped one")
    ap.add_argument("--cnn-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out, tag = Path(a.out), a.tag + "/" if a.tag else ""
    paths = realism_bench.cohorts(out)
    real = realism.cohort_volumes(paths["heldout"])
    jobs = [j.conditioning(0) for j in mask_jobs(f"cohort:{paths['heldout']}", 1)]
    for c, v in zip(jobs, real):
        assert np.array_equal(c.codes > 0, v.mask), "held-out masks and scans out of order"
    if a.partial:
        partial_chains(Sampler(a.weights, device="cpu", window=a.window), real, jobs, a.partial, tag + a.window,
                       out / "partial.json", a.cnn_steps, a.stride)
    if a.sampler:
        results = load(out / "sampler.json")
        for spec in a.sampler:
            if tag + spec in results:
                continue
            sampler, steps, window, *lam = spec.split(":")
            gen = Sampler(a.weights, sampler, int(steps), device="cpu", **realism_bench.evaluation(window))
            if lam:
                gen.model = EpsilonScaled(gen.model, scheduler(gen.diffusion).alphas_cumprod, float(lam[0]))
            t0 = time.perf_counter()
            hu = [sitk.GetArrayFromImage(gen.volumes([c.mask], [100 + i], [c.codes])[0]) for i, c in enumerate(jobs)]
            sec = (time.perf_counter() - t0) / len(jobs)
            np.save(out / f"chain_{(tag + spec).replace(':', '_').replace('/', '_')}.npy", np.stack(hu).astype(np.float32))
            results[tag + spec] = tested(real, hu, {"seconds_per_volume": round(sec, 1), "weights": a.weights}, a.cnn_steps)
            (out / "sampler.json").write_text(json.dumps(results, indent=1))
            print(tag + spec, results[tag + spec], flush=True)
    if a.seams:
        with warnings.catch_warnings():  # a boundary plane outside every body: nan
            warnings.simplefilter("ignore", RuntimeWarning)
            print("window-boundary |step| / neighbours' (z, y, x boundaries; nan: no body there):", seams(a.seams, real, out))
    for name in ("partial.json", "sampler.json"):
        for k, v in load(out / name).items():
            print(name, k, {x: v[x] for x in ("cnn", "cnn_train", "feat", "w1_lung", "w1_wall")})


if __name__ == "__main__":
    main()
