"""What the ServerApp and the ClientApp share: the weights on the wire (fp32, or bf16 to halve the
bytes) and the site's local round: ``medsyn train``'s own Trainer, driven in the ClientApp's process
(Flower starts one flwr-clientapp process per message, and it watches the SuperNode: a killed
SuperNode takes its training with it)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from medsyn_site.config import Config, ConfigError

log = logging.getLogger(__name__)

TRANSFERS = ("fp32", "bf16")
LOCAL_RUN = "local-run"  # the site's own run dir inside its work dir (a normal `medsyn train` run dir)


# -- weights on the wire ----------------------------------------------------------------------
def encode(state: dict[str, torch.Tensor], transfer: str = "fp32"):
    """A state_dict as a Flower ArrayRecord. bf16 floats travel as their raw 16 bits (numpy has no
    bfloat16): uint16 arrays on the wire are bf16, and nothing else in the model is uint16."""
    from flwr.app import ArrayRecord

    if transfer not in TRANSFERS:
        raise ValueError(f"weight transfer {transfer!r}: use one of {', '.join(TRANSFERS)}")
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(torch.bfloat16).view(torch.uint16) if transfer == "bf16" else v.float()
        out[k] = v.contiguous()
    return ArrayRecord(out)


def decode(record) -> dict[str, torch.Tensor]:
    """The fp32 state_dict of an ArrayRecord written by ``encode``."""
    out = {}
    for k, arr in record.items():
        a = arr.numpy()
        t = torch.from_numpy(np.ascontiguousarray(a))
        out[k] = t.view(torch.bfloat16).float() if a.dtype == np.uint16 else (t.float() if t.is_floating_point() else t)
    return out


def nbytes(record) -> int:
    """Payload bytes of an ArrayRecord (the arrays' data)."""
    return sum(len(arr.data) for arr in record.values())


# -- the site's local round -------------------------------------------------------------------
@dataclass
class LocalResult:
    weights: dict[str, torch.Tensor]
    num_examples: int
    loss: float
    steps: int
    seconds: float


def site_config(config_text: str, overrides: dict) -> Config:
    """The federation's config (sent by the server: model, diffusion, recipe) with the site's own
    hardware settings (device, precision, threads, DeepSpeed JSON) on top."""
    tree = yaml.safe_load(config_text)
    for key, value in overrides.items():
        tree.setdefault("train", {})[key] = value
    try:
        return Config.model_validate(tree)
    except Exception as e:  # pydantic's message names the field
        raise ConfigError(f"federation config with site overrides {overrides}: {e}") from e


def proximal_term(anchor: dict[str, torch.Tensor], mu: float):
    """FedProx's mu/2 * ||w - w_global||^2, as the trainer's ``extra_loss`` hook."""
    def term(engine) -> torch.Tensor:
        return mu / 2 * sum((p.float() - anchor[n]).pow(2).sum() for n, p in engine.module.named_parameters())
    return term


def run_local_round(cfg: Config, cohort: str | Path, work_dir: str | Path, weights: dict[str, torch.Tensor],
                    local_steps: int, prox_mu: float = 0.0) -> LocalResult:
    """Train ``local_steps`` steps from ``weights`` on the site's cohort, in this process, with the
    trainer of ``medsyn train`` resuming the site's local run dir (optimizer state, data order, RNG)."""
    from medsyn_site.diffusion.rundir import RunDir
    from medsyn_site.diffusion.train import Trainer

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    run = RunDir(work / LOCAL_RUN)
    resume = run.latest() is not None
    t0 = time.perf_counter()
    trainer = Trainer(cfg, cohort, run.root, resume=resume, force=not resume)
    try:
        trainer.set_weights(weights)
        if prox_mu:
            trainer.extra_loss = proximal_term({k: v.to(trainer.dev) for k, v in weights.items()}, prox_mu)
        losses = trainer.run_steps(local_steps)
        trainer.save()
        out = trainer.weights()
    finally:
        trainer.close()
    return LocalResult(out, len(trainer.cohort.split("train")), float(np.mean(losses)) if losses else float("nan"),
                       local_steps, time.perf_counter() - t0)
