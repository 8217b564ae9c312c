"""What the ServerApp and the ClientApp share: the weights on the wire (fp32, or bf16 to halve the
bytes) and the site's local round, which runs ``medsyn train``'s own trainer in a subprocess (so
DeepSpeed's and the signal handlers' process-global state stays out of the Flower node).

``python -m medsyn_site.federated.task`` is that subprocess's entry point."""
from __future__ import annotations

import argparse
import csv
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from medsyn_site.atomic import atomic_write_text
from medsyn_site.config import Config, ConfigError, load_config

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


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the Flower process that started it dies (Linux), so a killed
    SuperNode leaves no trainer behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_local_round(cfg: Config, cohort: str | Path, work_dir: str | Path, weights: dict[str, torch.Tensor],
                    local_steps: int, prox_mu: float = 0.0, timeout: float | None = None) -> LocalResult:
    """Train ``local_steps`` steps from ``weights`` on the site's cohort in a fresh process, with the
    trainer of ``medsyn train`` resuming the site's local run dir (optimizer state, data order, RNG)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    init, out, res, cfg_path = (work / n for n in ("global_in.pt", "local_out.pt", "local_out.json", "round.yaml"))
    torch.save(weights, init)
    atomic_write_text(cfg_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    for f in (out, res):
        f.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "medsyn_site.federated.task", "--config", str(cfg_path), "--cohort", str(cohort),
           "--run", str(work / LOCAL_RUN), "--init", str(init), "--out", str(out), "--steps", str(local_steps),
           "--prox-mu", str(prox_mu)]
    with open(work / "local.log", "a") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                              timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0 or not res.is_file():
        tail = (work / "local.log").read_text().splitlines()[-5:]
        raise RuntimeError(f"local round failed (exit {proc.returncode}); see {work / 'local.log'}: {' | '.join(tail)}")
    info = json.loads(res.read_text())
    return LocalResult(torch.load(out, map_location="cpu"), info["num_examples"], info["loss"], info["steps"],
                       info["seconds"])


def _local_main(argv: list[str] | None = None) -> None:
    """The subprocess: resume (or start) the site's run dir, run K more steps from the global weights."""
    from medsyn_site.data.cohort import Cohort
    from medsyn_site.diffusion.rundir import RunDir
    from medsyn_site.diffusion.train import train

    ap = argparse.ArgumentParser(description=_local_main.__doc__)
    for name in ("--config", "--cohort", "--run", "--init", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--prox-mu", type=float, default=0.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = RunDir(a.run)
    resume = run.latest() is not None
    start = int(torch.load(run.latest_weights(), map_location="cpu")["step"]) if resume else 0
    cfg = load_config(a.config, {"train.steps": start + a.steps,
                                 "train.log_every": 1})  # every local step's loss goes to metrics.csv
    t0 = time.perf_counter()
    train(cfg, a.cohort, a.run, resume=resume, force=not resume, init_weights=torch.load(a.init, map_location="cpu"),
          prox_mu=a.prox_mu, weights_out=Path(a.out))
    seconds = time.perf_counter() - t0
    with open(run.root / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if int(r["step"]) > start]
    n = len(Cohort(a.cohort).split("train"))
    atomic_write_text(Path(a.out).with_suffix(".json"), json.dumps(
        {"num_examples": n, "loss": float(np.mean(losses)) if losses else float("nan"), "steps": a.steps,
         "seconds": seconds}))


if __name__ == "__main__":
    _local_main()
