"""Streamed whole-volume evaluation against MONAI's whole forward (a benchmark, not a test).

"Device" bytes are counted exactly on the CPU: the peak of tensor storage alive at once during one
evaluation (a TorchDispatchMode; the Store's host maps, the input and the weights excluded). At one
volume size, each in a fresh process (CPU, fp32): MONAI's forward, and the streamed evaluation with
every level above the bottom two streamed:
- all feature maps kept on the device (no budget): the maps' peak, the time overhead;
- none kept (budget 0), at two slab sizes: what remains is slab working memory; its growth between
  the two sizes gives bytes per slab voxel, the rest is fixed;
- a budget of the same fraction of the maps that --budget-gib is of the 512x512x256 bf16 maps: bytes
  moved between host and device at that fraction.
For a 24 GB GPU in bf16 it predicts: device = min(maps, budget) + slab memory at StreamedUNet's default
slab + weights; host = the rest; time = FLOPs at a stated fraction of the GPU's peak + bytes moved
over PCIe. bf16 halves maps and moved bytes; slab memory is kept at its fp32 size (conservative).

  python benchmarks/streamed.py --size 64x64x64 --out benchmarks/streamed_cpu.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import resource
import time
import weakref

import torch
import torch.utils._pytree as pytree
from _common import in_fresh_process, report
from torch.utils._python_dispatch import TorchDispatchMode

from medsyn_site.config import load_config
from medsyn_site.diffusion.model import build_unet
from medsyn_site.diffusion.streamed import Store, StreamedUNet

GiB = 2 ** 30
SLAB_VOXELS = inspect.signature(StreamedUNet).parameters["slab_voxels"].default
TARGETS = {"256x256x128": 256 * 256 * 128, "512x512x256": 512 * 512 * 256}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once, counting storages created while active except
    those listed in ``outside`` (the Store's host maps, the input, the weights)."""

    def __init__(self, outside):
        super().__init__()
        self.outside, self.seen, self.live, self.peak, self.paused = set(outside), set(), 0, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [] if self.paused else pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr and ptr not in self.seen and ptr not in self.outside:
                    n = t.untyped_storage().nbytes()
                    self.seen.add(ptr)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, ptr, n)
        return out

    def _free(self, ptr: int, n: int) -> None:
        self.seen.discard(ptr)
        self.live -= n


def _one(model: str, zyx, budget, slab_rows: int, whole_voxels: int, queue) -> None:
    torch.manual_seed(0)
    net = build_unet(load_config(model).model).eval()
    x, t = torch.randn(1, 5, *zyx), torch.tensor([500])
    fn = net if budget is None else StreamedUNet(net, slab_voxels=zyx[1] * zyx[2] * slab_rows, budget_bytes=budget,
                                                 whole_voxels=whole_voxels)
    tracker = LiveBytes([p.untyped_storage().data_ptr() for p in [x, t, *net.parameters()]])
    host_empty = Store._host_empty

    def untracked(store, shape, dtype):  # the Store's host maps are not device memory
        tracker.paused = True
        h = host_empty(store, shape, dtype)
        tracker.paused = False
        tracker.outside.add(h.untyped_storage().data_ptr())
        return h
    Store._host_empty = untracked
    with torch.no_grad():
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        with tracker:
            fn(x, t)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    store = getattr(fn, "store", None)
    queue.put({"budget": budget, "slab_voxels": zyx[1] * zyx[2] * slab_rows if store else None,
               "s_per_eval": seconds, "peak_rss_bytes": peak, "device_peak_bytes": tracker.peak,
               "maps_peak": store.peak if store else None, "moved_bytes": store.moved if store else 0})


def measure(*args) -> dict:
    row = in_fresh_process(_one, *args)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lidc")
    ap.add_argument("--size", default="64x64x64", help="XxYxZ")
    ap.add_argument("--slab-rows", type=int, nargs=2, default=(4, 16), help="two slab depths (full-resolution rows)")
    ap.add_argument("--whole-voxels", type=int, default=8192, help="levels up to this size run MONAI's forward")
    ap.add_argument("--flops-per-voxel", type=float, default=6.87e6, help="sampling.py's measurement")
    ap.add_argument("--gpu-tflops", type=float, default=120.0, help="a 24 GB GPU's dense bf16 peak")
    ap.add_argument("--utilisation", type=float, default=0.3, help="fraction of that peak 3-D convs reach")
    ap.add_argument("--pcie-gbs", type=float, default=20.0, help="host<->device GB/s (PCIe 4 x16, pinned)")
    ap.add_argument("--budget-gib", type=float, default=14.0, help="feature maps kept on the 24 GB GPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    x, y, z = (int(v) for v in args.size.split("x"))
    zyx, voxels, (r1, r2) = (z, y, x), x * y * z, args.slab_rows
    params = sum(p.numel() for p in build_unet(load_config(args.model).model).parameters())
    whole = measure(args.model, zyx, None, r1, args.whole_voxels)
    alldev = measure(args.model, zyx, float("inf"), r1, args.whole_voxels)
    maps = alldev["maps_peak"]["device"]
    host1, host2 = (measure(args.model, zyx, 0, r, args.whole_voxels) for r in (r1, r2))
    big_maps = maps / voxels / 2 * TARGETS["512x512x256"]
    fraction = min(1.0, args.budget_gib * GiB / big_maps)
    part = measure(args.model, zyx, fraction * maps, r1, args.whole_voxels)
    scratch = [h["device_peak_bytes"] for h in (host1, host2)]  # maps all on the host: slab work only
    per_slab_voxel = (scratch[1] - scratch[0]) / (host2["slab_voxels"] - host1["slab_voxels"])
    fixed = scratch[0] - per_slab_voxel * host1["slab_voxels"]
    eff = args.gpu_tflops * 1e12 * args.utilisation
    predict = {}
    for name, v in TARGETS.items():
        m = maps / voxels / 2 * v
        keep = min(m, args.budget_gib * GiB)
        moved = 0.0 if keep >= m else part["moved_bytes"] / voxels / 2 * v  # measured at 512's fraction
        s_eval = args.flops_per_voxel * v / eff + moved / (args.pcie_gbs * 1e9)
        device = keep + per_slab_voxel * SLAB_VOXELS + fixed + 6 * params  # weights: fp32 + bf16 copies
        predict[name] = {"feature_maps_gib": m / GiB, "device_gib": device / GiB,
                         "host_gib": (m - keep) / GiB, "moved_gb_per_eval": moved / 1e9,
                         "s_per_eval": s_eval, "ddim50_min": 50 * s_eval / 60}
    result = {"model": args.model, "size": args.size, "params": params,
              "rows": {"whole": whole, "all_device": alldev, "all_host_r1": host1, "all_host_r2": host2,
                       "budget_fraction": part},
              "whole_peak_bytes_per_voxel": whole["device_peak_bytes"] / voxels,
              "streamed_all_device_peak_bytes_per_voxel": alldev["device_peak_bytes"] / voxels,
              "feature_map_bytes_per_voxel": maps / voxels,
              "slab_bytes_per_slab_voxel": per_slab_voxel, "slab_fixed_bytes": fixed,
              "default_slab_voxels": SLAB_VOXELS,
              "moved_bytes_per_voxel": {"budget_0": host1["moved_bytes"] / voxels,
                                        f"budget_{fraction:.2f}_of_maps": part["moved_bytes"] / voxels},
              "time_overhead_vs_whole": alldev["s_per_eval"] / whole["s_per_eval"] - 1,
              "assumed": {k: getattr(args, k) for k in ("gpu_tflops", "utilisation", "pcie_gbs", "budget_gib",
                                                         "flops_per_voxel")},
              "predict_bf16": predict}
    report(result, args.out)


if __name__ == "__main__":
    main()
