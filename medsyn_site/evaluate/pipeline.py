"""``medsyn evaluate run``: every step of the utility test in one command (as the demo runs it).
Each training is its own process (``medsyn evaluate train``), exactly what a Slurm array runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

from medsyn_site.atomic import atomic_write_text
from medsyn_site.evaluate.datasets import EvaluationError, load_workspace, prepare_workspace
from medsyn_site.evaluate.report import select_targeted, write_report


def set_seeds(ws: Path, seeds: int) -> None:
    state = load_workspace(ws)
    state["seeds"] = list(range(seeds))
    atomic_write_text(ws / "workspace.json", json.dumps(state, indent=1))


def train_arms(ws: Path, arms: list[str], seeds: int, trainer: str, epochs: int, iterations: int, device: str,
               mirroring: bool = True) -> None:
    total = len(arms) * seeds
    for i, (arm, seed) in enumerate(((a, s) for a in arms for s in range(seeds)), start=1):
        click.echo(f"[evaluate] training {i}/{total}: arm {arm}, seed {seed}")
        cmd = [sys.executable, "-m", "medsyn_site.cli", "evaluate", "train", "--ws", str(ws), "--arm", arm,
               "--seed", str(seed), "--trainer", trainer, "--epochs", str(epochs), "--iterations", str(iterations),
               "--device", device, "--mirroring" if mirroring else "--no-mirroring"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise EvaluationError(f"nnU-Net training of arm {arm} seed {seed} failed:\n{tail}")


def run_all(real, synthetic, ws, seeds: int = 5, trainer: str = "nnUNetTrainer_medsyn", epochs: int = 2,
            iterations: int = 5, device: str = "cpu", configuration: str = "3d_fullres", run=None,
            sampler: str = "ddim", steps: int = 50, per_mask: int = 1, site_key=None, mirroring: bool = True) -> dict:
    """Prepare, train every arm K times, select and sample targeted cases (with ``run``), report."""
    ws = Path(ws)
    arms = prepare_workspace(ws, real, synthetic, configuration=configuration)
    set_seeds(ws, seeds)
    train_arms(ws, arms, seeds, trainer, epochs, iterations, device, mirroring)
    if run is not None:
        from medsyn_site.diffusion.sample import sample_cohort

        request, cases = select_targeted(ws)
        click.echo(f"[evaluate] targeted cases (below the real-only mean validation Dice): {', '.join(cases)}")
        targeted = ws / "targeted_synthetic"
        kwargs = {"site_key": site_key} if site_key else {}
        sample_cohort(run, f"request:{request}", targeted, per_mask=per_mask, sampler=sampler, steps=steps,
                      force=True, **kwargs)
        prepare_workspace(ws, real, targeted=targeted, configuration=configuration, arms=["real+targeted"])
        set_seeds(ws, seeds)
        train_arms(ws, ["real+targeted"], seeds, trainer, epochs, iterations, device, mirroring)
    return write_report(ws)
