"""Activation memory and speed of one training step of the DDPM UNet (a benchmark, not a test).

For growing patch sizes, the bytes autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks,
parameters excluded) in three modes:
  none        no activation checkpointing
  ckpt        DeepSpeed activation checkpointing of every ResNet block
  ckpt+off    ... with the checkpointed block inputs offloaded to CPU (cpu_checkpointing): their bytes
              leave the accelerator, so they are subtracted from what stays there
plus the recompute peak (the largest single block's activations, re-made during backward). On CUDA it
also reports torch.cuda.max_memory_allocated. Bytes grow linearly with the patch's voxels (no attention),
so a fit per voxel predicts the largest patch that fits 24 GB for the paper-sized model.

Speed: the DeepSpeed engine against a plain PyTorch loop (same model, AdamW, patch, threads), without
and with checkpointing (torch.utils.checkpoint for the plain loop).

  python benchmarks/memory.py --model lidc --sizes 16 24 32 48 --speed-model tiny --speed-patch 32
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from medsyn_site.config import load_config
from medsyn_site.diffusion import engine as eng
from medsyn_site.diffusion.model import build_unet, enable_activation_checkpointing

GiB = 2 ** 30


def _storages_of(tensors) -> dict:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def activation_bytes(net, x, t, checkpoint_fn=None) -> dict:
    """Saved-for-backward bytes of one forward, the checkpointed inputs among them, recompute peak."""
    params = set(_storages_of(net.parameters()))
    saved, ckpt_inputs = {}, {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    def recording_checkpoint(fn, *args):
        ckpt_inputs.update(_storages_of(a for a in args if torch.is_tensor(a)))
        return checkpoint_fn(fn, *args)

    if checkpoint_fn is not None:
        enable_activation_checkpointing(net, recording_checkpoint)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda u: u):
        out = net(x, t)
    # DeepSpeed keeps checkpointed inputs as ctx attributes, out of sight of the hooks: add them.
    acts = {**{k: v for k, v in saved.items() if k not in params}, **ckpt_inputs}
    out.float().mean().backward()
    return {"saved": sum(acts.values()), "ckpt_inputs": sum(ckpt_inputs.values())}


def block_peak(net, x, t) -> int:
    """The largest activation bytes any one ResNet block saves (what recomputation needs at once)."""
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    sizes, current = [], []

    def pre(module, args):
        current.append({})

    def post(module, args, output):
        sizes.append(sum(current.pop().values()))

    def pack(tensor):
        if current:
            current[-1][tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    handles = [m.register_forward_pre_hook(pre) for m in net.modules() if isinstance(m, DiffusionUNetResnetBlock)]
    handles += [m.register_forward_hook(post) for m in net.modules() if isinstance(m, DiffusionUNetResnetBlock)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda u: u):
        net(x, t)
    for h in handles:
        h.remove()
    return max(sizes)


def memory_table(cfg, sizes, batch, dev) -> list[dict]:
    import deepspeed

    deepspeed.checkpointing.configure(None, deepspeed_config=eng.load_deepspeed_config(cfg.train),
                                      checkpoint_in_cpu=False)
    rows = []
    for p in sizes:
        x = torch.randn(batch, 5, p, p, p, device=dev)
        t = torch.randint(0, 1000, (batch,), device=dev)
        row = {"patch": p, "batch": batch}
        torch.manual_seed(0)
        net = build_unet(cfg.model).to(dev)
        row["none"] = activation_bytes(net, x, t)["saved"]
        row["block_peak"] = block_peak(net, x, t)
        net = build_unet(cfg.model).to(dev)
        ck = activation_bytes(net, x, t, deepspeed.checkpointing.checkpoint)
        row["ckpt"] = ck["saved"]
        row["ckpt_off"] = ck["saved"] - ck["ckpt_inputs"]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            net = build_unet(cfg.model).to(dev)
            base = torch.cuda.memory_allocated()
            net(x, t).float().mean().backward()
            row["cuda_peak_none"] = torch.cuda.max_memory_allocated() - base
        rows.append(row)
        print(json.dumps({k: (round(v / 2 ** 20, 1) if isinstance(v, int) and k not in ("patch", "batch") else v)
                          for k, v in row.items()}), flush=True)

    return rows


def _timed_pair(a, b, n_warm=3, n=15) -> tuple[float, float]:
    """Median seconds of steps a and b, interleaved (a, b, a, b, ...) so load drift hits both alike."""
    for _ in range(n_warm):
        a()
        b()
    ta, tb = [], []
    for _ in range(n):
        for step, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def speed(cfg, patch, batch, dev) -> dict:
    from torch.utils.checkpoint import checkpoint as torch_ckpt

    x = torch.randn(batch, 5, patch, patch, patch, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    out = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = build_unet(cfg.model).to(dev)
        if ckpt:
            enable_activation_checkpointing(net, lambda f, *a: torch_ckpt(f, *a, use_reentrant=False))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def plain():
            opt.zero_grad(set_to_none=True)
            net(x, t).float().abs().mean().backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        tc = cfg.train.model_copy(update={"activation_checkpointing": ckpt, "batch_size": batch})
        engine, _ = eng.make_engine(build_unet(cfg.model), tc)

        def ds():
            loss = engine(x, timesteps=t).float().abs().mean()
            engine.backward(loss)
            engine.step()
        suffix = "_ckpt" if ckpt else ""
        out[f"plain{suffix}_s"], out[f"deepspeed{suffix}_s"] = _timed_pair(plain, ds)
        out[f"deepspeed_overhead{suffix}"] = out[f"deepspeed{suffix}_s"] / out[f"plain{suffix}_s"] - 1

    print(json.dumps(out), flush=True)
    return out


def predict(fit: dict, n_params: int, gpu_gib: float = 24.0, reserve_gib: float = 2.0) -> dict:
    """Predicted accelerator memory of one bf16 training step (batch 1) per mode, and the largest
    cubic patch (multiple of 16) that fits ``gpu_gib``. Activations halve from fp32 to bf16; the
    recompute of one block needs its activations and their gradients (2x block_peak); model states
    under ZeRO-2 with the optimizer on the CPU are bf16 weights + bf16 gradients (4 bytes/param);
    ``reserve_gib`` covers the CUDA context, cuDNN workspace and fragmentation."""
    states = 4 * n_params

    def need(mode, p):
        v = p ** 3
        acts = 0.5 * (fit[mode]["bytes_per_voxel"] * v + fit[mode]["intercept"])
        if mode != "none":
            acts += 0.5 * 2 * (fit["block_peak"]["bytes_per_voxel"] * v + fit["block_peak"]["intercept"])
        return (acts + states) / GiB + reserve_gib
    out = {}
    for mode in ("none", "ckpt", "ckpt_off"):
        fits = [p for p in range(16, 513, 16) if need(mode, p) <= gpu_gib]
        out[mode] = {"gib_at_128": round(need(mode, 128), 2), "largest_patch": max(fits) if fits else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lidc", help="config whose model is measured (a shipped config name or a YAML file)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32, 48])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--speed-model", default="tiny")
    ap.add_argument("--speed-patch", type=int, default=32)
    ap.add_argument("--speed-batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--speed-only", action="store_true", help="skip the memory table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    eng.init_distributed()
    dev = eng.device()
    if args.speed_only:
        result = {"device": str(dev), "model": args.speed_model, "patch": args.speed_patch, "batch": args.speed_batch,
                  "threads": torch.get_num_threads(),
                  "speed": speed(load_config(args.speed_model), args.speed_patch, args.speed_batch, dev)}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    cfg = load_config(args.model)
    rows = memory_table(cfg, args.sizes, args.batch, dev)
    # linear fit bytes = a * voxels + b for each mode, and the 24 GB prediction
    fit = {}
    for mode in ("none", "ckpt", "ckpt_off", "block_peak"):
        xs = [r["patch"] ** 3 for r in rows]
        ys = [r[mode] for r in rows]
        a = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
        fit[mode] = {"bytes_per_voxel": a, "intercept": ys[-1] - a * xs[-1]}
    n_params = sum(p.numel() for p in build_unet(cfg.model).parameters())
    result = {"device": str(dev), "model": args.model, "params": n_params, "rows": rows, "fit": fit,
              "predict_24GB": predict(fit, n_params)}
    result["speed"] = speed(load_config(args.speed_model), args.speed_patch, args.speed_batch, dev)
    print(json.dumps({"params": n_params, "fit": fit, "predict_24GB": result["predict_24GB"]}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
