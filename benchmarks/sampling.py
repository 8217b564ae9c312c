"""Whole-volume sampling cost (a benchmark, not a test): per network evaluation, against volume size.

Each sampler step is one UNet evaluation on the whole volume, so a run costs steps x that (DDIM 20,
DDIM 50, DDPM 1000 are reported from the measured per-step time; one real DDIM run checks it). For each
size it measures: seconds per evaluation, FLOPs per evaluation (torch.utils.flop_counter), and the
peak extra memory of one no-grad evaluation (RSS in a fresh process on the CPU; max_memory_allocated
on CUDA). Bytes and FLOPs grow linearly with voxels, which gives the predictions for 24 GB GPUs.

  python benchmarks/sampling.py --model tiny --sizes 32x32x32 64x64x48 96x96x64
  python benchmarks/sampling.py --model lidc --sizes 32x32x32 48x48x48 64x64x64
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from _common import in_fresh_process, report

from medsyn_site.config import load_config
from medsyn_site.diffusion.model import build_unet

GiB = 2 ** 30


def _one(model: str, zyx, device: str, queue) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = load_config(model)
    net = build_unet(cfg.model).to(device).eval()
    x = torch.randn(1, 5, *zyx, device=device)
    t = torch.tensor([500], device=device)
    with torch.no_grad():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        net(x, t)
        peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            net(x, t)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        with FlopCounterMode(display=False) as fc:
            net(x, t)
    queue.put({"zyx": list(zyx), "voxels": x[0, 0].numel(), "s_per_eval": statistics.median(times),
               "flops": fc.get_total_flops(), "peak_bytes": peak})


def ddim_check(model: str, zyx, steps: int, device: str) -> float:
    """Wall time of a real DDIM run through MONAI's inferer, as `medsyn sample` does it."""
    from monai.inferers import DiffusionInferer

    from medsyn_site.diffusion.model import sampling_scheduler

    cfg = load_config(model)
    net = build_unet(cfg.model).to(device).eval()
    sched = sampling_scheduler(cfg.diffusion, "ddim", steps)
    cond = torch.zeros(1, 4, *zyx, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        DiffusionInferer(sched).sample(torch.randn(1, 1, *zyx, device=device), net, sched, conditioning=cond,
                                       mode="concat", verbose=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--sizes", nargs="+", default=["32x32x32", "64x64x48", "96x96x64"], help="XxYxZ")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check-steps", type=int, default=20)
    ap.add_argument("--gpu-tflops", type=float, default=120.0, help="a 24 GB GPU's dense bf16 peak (A10/L4 class)")
    ap.add_argument("--utilisation", type=float, default=0.3, help="fraction of that peak 3-D convs reach")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for s in args.sizes:
        x, y, z = (int(v) for v in s.split("x"))
        row = in_fresh_process(_one, args.model, (z, y, x), args.device)
        row["xyz"] = [x, y, z]
        for name, steps in (("ddim20_s", 20), ("ddim50_s", 50), ("ddpm1000_s", 1000)):
            row[name] = steps * row["s_per_eval"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    big = rows[-1]
    x, y, z = big["xyz"]
    check = ddim_check(args.model, (z, y, x), args.check_steps, args.device)
    flops_per_voxel = big["flops"] / big["voxels"]
    bytes_per_voxel = big["peak_bytes"] / big["voxels"]
    eff = args.gpu_tflops * 1e12 * args.utilisation
    predict = {}
    for name, (px, py, pz) in {"256x256x128": (256, 256, 128), "512x512x256": (512, 512, 256)}.items():
        v = px * py * pz
        predict[name] = {"ddim50_s_predicted": 50 * flops_per_voxel * v / eff,
                         "peak_gib_fp32_predicted": bytes_per_voxel * v / GiB,
                         "peak_gib_bf16_predicted": bytes_per_voxel * v / 2 / GiB}
    largest = max((s for s in range(64, 1025, 32) if bytes_per_voxel / 2 * s * s * s / 2 <= 22 * GiB), default=None)
    result = {"model": args.model, "device": args.device, "rows": rows,
              "ddim_check": {"xyz": big["xyz"], "steps": args.check_steps, "s": check,
                             "predicted_s": args.check_steps * big["s_per_eval"]},
              "flops_per_voxel": flops_per_voxel, "peak_bytes_per_voxel_fp32": bytes_per_voxel,
              "assumed_gpu": {"tflops_bf16": args.gpu_tflops, "utilisation": args.utilisation},
              "predict": predict, "largest_SxSxS/2_bf16_in_22GiB": largest}
    report(result, args.out)


if __name__ == "__main__":
    main()
