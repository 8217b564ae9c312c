"""The run dir contract: resolved config, checkpoints (DeepSpeed engine state + EMA weights + step +
RNG), metrics. A checkpoint is written into a temp folder and renamed into place, then ``latest`` is
replaced atomically, so a crash mid-write never touches the previous checkpoint."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from medsyn_site.atomic import atomic_write_text, refuse_existing, sha256_file
from medsyn_site.config import Config, dump_config

EMA_FILE = "ema.pt"


class RunError(ValueError):
    """A run dir cannot be used as asked (resume without checkpoint, config mismatch, ...)."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _differences(a: dict, b: dict, prefix="") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return out


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.ckpt = self.root / "checkpoints"

    # -- setup -------------------------------------------------------------------------------
    def create(self, cfg: Config, force: bool) -> None:
        """A new run: refuse an existing run dir unless --force (then old checkpoints go)."""
        refuse_existing(self.root, force)
        if self.ckpt.exists():
            shutil.rmtree(self.ckpt)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "config.yaml", dump_config(cfg))

    def check_resume(self, cfg: Config) -> None:
        """Resuming needs a run dir (a run stopped before its first checkpoint restarts at step 0)
        and the same config (train.steps may grow)."""
        if not (self.root / "config.yaml").is_file():
            raise RunError(f"{self.ckpt}: no checkpoint to resume from")
        saved = yaml.safe_load((self.root / "config.yaml").read_text())
        now = cfg.model_dump(mode="json")
        saved["train"]["steps"] = now["train"]["steps"]
        diff = _differences(saved, now)
        if diff:
            raise RunError(f"{self.root / 'config.yaml'}: --resume with a different config: " + "; ".join(diff))
        atomic_write_text(self.root / "config.yaml", dump_config(cfg))

    # -- checkpoints -------------------------------------------------------------------------
    def latest(self) -> str | None:
        f = self.ckpt / "latest"
        return f.read_text().strip() if f.is_file() else None

    def latest_weights(self) -> Path:
        """The EMA weights file of the latest checkpoint (what sampling uses)."""
        tag = self.latest()
        if tag is None:
            raise RunError(f"{self.ckpt}: no checkpoint")
        return self.ckpt / tag / EMA_FILE

    def save(self, engine, ema, step: int, cfg: Config, keep: int) -> Path:
        tag = f"step_{step:08d}"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt / f".tmp-{tag}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            engine.save_checkpoint(str(tmp), tag=tag, client_state={"step": step, "rng": rng_state()},
                                   save_latest=False)
            torch.save({"ema": ema.state_dict(), "step": step, "model": cfg.model.model_dump(mode="json"),
                        "diffusion": cfg.diffusion.model_dump(mode="json")}, tmp / tag / EMA_FILE)
            final = self.ckpt / tag
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp / tag, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_text(self.ckpt / "latest", tag)
        old = sorted(p for p in self.ckpt.glob("step_*") if p.name != tag)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def load(self, engine, ema) -> int:
        """Restore the latest checkpoint; returns its step (0: none yet, the run starts over)."""
        tag = self.latest()
        if tag is None:
            return 0
        path, client = engine.load_checkpoint(str(self.ckpt), tag=tag)
        if path is None:
            raise RunError(f"{self.ckpt / tag}: checkpoint could not be loaded")
        ema.load_state_dict(torch.load(self.ckpt / tag / EMA_FILE, map_location="cpu")["ema"])
        set_rng_state(client["rng"])
        return int(client["step"])


def load_weights(path: str | Path) -> dict:
    """An EMA weights file with its sha256 (the provenance of everything sampled from it)."""
    path = Path(path)
    blob = torch.load(path, map_location="cpu")
    blob["sha256"] = sha256_file(path)
    return blob

