"""The DeepSpeed engine for one process or many: distributed init, the JSON config, activation
checkpointing with CPU offload. The same code runs on DeepSpeed's CPU accelerator and on CUDA."""
from __future__ import annotations

import functools
import logging
import math
import os
import socket
import subprocess
from pathlib import Path

import torch

from medsyn_site.atomic import read_json
from medsyn_site.config import CONFIG_DIR, ConfigError, TrainConfig
from medsyn_site.diffusion.model import enable_activation_checkpointing
from medsyn_site.errors import MedsynError

log = logging.getLogger(__name__)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a process group's rendezvous, a test's service)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_accelerator(device: str) -> None:
    """Pin DeepSpeed's accelerator (before deepspeed is imported); 'auto' lets it detect."""
    if device != "auto":
        os.environ["DS_ACCELERATOR"] = device


def _ranks_from_slurm() -> None:
    """srun starts every task itself (no torchrun) with SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS:
    map them to torch.distributed's RANK / LOCAL_RANK / WORLD_SIZE; the rendezvous is the step's
    first node (MASTER_ADDR / MASTER_PORT, unless the job script set them)."""
    env = os.environ
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "RANK" in env or "SLURM_PROCID" not in env or tasks < 2:
        return
    # LOCAL_RANK picks the GPU: a task bound to one GPU (srun --gpus-per-task 1) sees it as device 0
    one_gpu = len(env.get("CUDA_VISIBLE_DEVICES", "").split(",")) == 1 and env.get("CUDA_VISIBLE_DEVICES")
    env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK="0" if one_gpu else env.get("SLURM_LOCALID", "0"),
               WORLD_SIZE=str(tasks))
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
            env["MASTER_ADDR"] = out.stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            if int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1) > 1:
                raise ConfigError(f"srun on nodes {nodes!r}: cannot find the first node (scontrol failed); "
                                  "export MASTER_ADDR in the job script") from None
            env["MASTER_ADDR"] = "127.0.0.1"
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID") or 0) % 10000))


def init_distributed() -> None:
    """Start torch.distributed through DeepSpeed. A lone process (no launcher) gets world size 1
    on 127.0.0.1; under the deepspeed launcher or torchrun the environment is already set; under
    srun it comes from Slurm's variables."""
    _ranks_from_slurm()
    if "RANK" not in os.environ or os.environ.get("MEDSYN_SOLO_DIST") == "1":
        # No launcher (or only our own defaults, inherited by a child process): a fresh port.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()), MEDSYN_SOLO_DIST="1")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if os.environ["WORLD_SIZE"] == "1" or get_accelerator().device_name() == "cpu":
        # One process has nothing to share through shared memory, and CPU processes reduce through
        # gloo: skip JIT-building DeepSpeed's shared-memory op (a compiler at run time).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a stop signal reached one process)."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _agreed(fn, args, every_rank: bool):
    import torch.distributed as dist

    rank, world = rank_world()
    result, err = None, None
    if every_rank or rank == 0:
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks hear of it
            err = e
    if world > 1:
        heard = [None] * world
        mine = (None if err is None else (isinstance(err, MedsynError), f"{type(err).__name__}: {err}"),
                result if rank == 0 else None)
        dist.all_gather_object(heard, mine)
        failed = [(r, e) for r, (e, _) in enumerate(heard) if e]
        if err is None and failed:
            r, (domain, msg) = failed[0]
            raise (MedsynError if domain else RuntimeError)(f"rank {r} failed: {msg}")
        result = heard[0][1] if err is None else result
    if err is not None:
        raise err
    return result


def on_rank0(fn, *args):
    """Run ``fn`` on rank 0 only (the one writer of the run dir) and return its result on every
    rank; its error is raised on every rank (no rank waits forever in the next collective call)."""
    return _agreed(fn, args, every_rank=False)


def on_every_rank(fn, *args):
    """Run ``fn`` on every rank; an error on any rank is raised on every rank. Returns rank 0's result."""
    return _agreed(fn, args, every_rank=True)


def load_deepspeed_config(cfg: TrainConfig) -> dict:
    """The JSON config (a path, or relative to the shipped configs) with batch size and precision
    from ``cfg``."""
    path = Path(cfg.deepspeed_config)
    if not path.is_absolute() and not path.exists():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise ConfigError(f"{cfg.deepspeed_config}: DeepSpeed config not found")
    ds = read_json(path, ConfigError, "DeepSpeed config not found")
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds.pop("train_batch_size", None)
    ds["bf16"] = {"enabled": cfg.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.precision == "fp16", "initial_scale_power": 12}
    return ds


def on_accelerator() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return torch.device(acc.device_name(acc.current_device()) if acc.device_name() != "cpu" else "cpu")


def fp32_masters(engine):
    """``master(param)``: the optimizer's full float32 master copy of a module parameter (on its
    device), or None where the module weights are the master (fp32 without ZeRO). bf16/fp16 without
    ZeRO: DeepSpeed's unfused FP16 optimizer pairs each low-precision parameter with an fp32 one;
    ZeRO 1-3: ``safe_get_full_fp32_param`` (collective: every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = getattr(engine, "optimizer", None)
    pairs = {id(lp): hp for lps, hps in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
             if isinstance(hps, list) for lp, hp in zip(lps, hps)}
    return lambda p: pairs[id(p)] if id(p) in pairs else safe_get_full_fp32_param(p)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a share of train.lr: a linear warm-up,
    then constant or cosine-annealed to 0 at train.steps."""
    warm = max(cfg.warmup_steps, 1)
    if step + 1 < warm or cfg.lr_schedule == "constant":
        return min(1.0, (step + 1) / warm)
    done = min(1.0, (step + 1 - warm) / max(cfg.steps - warm, 1))
    return 0.5 * (1 + math.cos(math.pi * done))


def make_engine(net: torch.nn.Module, cfg: TrainConfig):
    """deepspeed.initialize with AdamW (a torch optimizer: no fused-Adam JIT build) and a linear
    warm-up; activation checkpointing of every ResNet block, offloaded to CPU on accelerators."""
    import deepspeed

    ds = load_deepspeed_config(cfg)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))
    engine, _, _, lr_sched = deepspeed.initialize(model=net, optimizer=optimizer, lr_scheduler=lr_sched,
                                                  config=ds)
    if cfg.activation_checkpointing:
        ac = ds.get("activation_checkpointing", {})
        offload = bool(ac.get("cpu_checkpointing", False))
        if offload and not on_accelerator():
            # On the CPU the "offload" would copy a tensor onto itself, and DeepSpeed then frees it.
            log.info("activation offload (cpu_checkpointing) skipped: activations already live on the CPU")
            offload = False
        deepspeed.checkpointing.configure(None, deepspeed_config=ds, checkpoint_in_cpu=offload)
        n = enable_activation_checkpointing(engine.module, deepspeed.checkpointing.checkpoint)
        log.info("activation checkpointing on %d ResNet blocks (CPU offload: %s)", n, offload)
    return engine, lr_sched
