"""``medsyn evaluate run``: every step of the utility test in one command (as the demo runs it).
Each training is its own process (``medsyn evaluate train``), exactly what a Slurm array runs."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medsyn_site.atomic import atomic_write_text
from medsyn_site.config import usable_cores
from medsyn_site.evaluate.datasets import EvaluationError, load_workspace, prepare_workspace
from medsyn_site.evaluate.report import select_targeted, write_report
from medsyn_site.progress import log as progress


def set_seeds(ws: Path, seeds: int) -> None:
    state = load_workspace(ws)
    state["seeds"] = list(range(seeds))
    atomic_write_text(ws / "workspace.json", json.dumps(state, indent=1))


def train_runs(ws: Path, runs: list[tuple[str, int]], trainer: str, epochs: int, iterations: int, device: str,
               mirroring: bool = True, jobs: int = 1, batch_size: int | None = None) -> None:
    """These (arm, seed) trainings, ``jobs`` at a time (processes; on a CPU the cores are split
    between them: small nnU-Net trainings use two 1-thread processes better than one 2-thread one)."""
    env = None
    if jobs > 1:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, usable_cores() // jobs))}

    def one(i: int, arm: str, seed: int) -> None:
        progress.info(f"[evaluate] training {i}/{len(runs)}: arm {arm}, seed {seed}")
        cmd = [sys.executable, "-m", "medsyn_site.cli", "evaluate", "train", "--ws", str(ws), "--arm", arm,
               "--seed", str(seed), "--trainer", trainer, "--epochs", str(epochs), "--iterations", str(iterations),
               "--device", device, "--mirroring" if mirroring else "--no-mirroring"]
        cmd += ["--batch-size", str(batch_size)] if batch_size else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise EvaluationError(f"nnU-Net training of arm {arm} seed {seed} failed:\n{tail}")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(one, i, arm, seed) for i, (arm, seed) in enumerate(runs, start=1)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the ones already running finish; no new one starts
            raise


def run_all(real, synthetic, ws, seeds: int = 5, trainer: str = "nnUNetTrainer_medsyn", epochs: int = 2,
            iterations: int = 5, device: str = "cpu", configuration: str = "3d_fullres",
            site: Callable[[Path], Path] | None = None, per_mask: int = 1, verbatim_masks: bool = False,
            mirroring: bool = True, jobs: int = 1, real_sizes=(), batch_size: int | None = None) -> dict:
    """Prepare, train every arm K times (``jobs`` trainings at once), and report. With ``site`` (the
    site's answer to a request: request file -> released NIfTI cohort, e.g.
    medsyn_site.targeted.answer_request), also the targeted arm: select the worst validation cases,
    write the request, let the site sample and publish it, and train real + the release. With
    ``real_sizes``, also the low-data curve (real@N and real+synthetic@N)."""
    ws = Path(ws)
    arms = prepare_workspace(ws, real, synthetic, configuration=configuration, real_sizes=real_sizes)
    set_seeds(ws, seeds)
    runs = [(a, s) for a in arms for s in range(seeds)]  # real first: the targeted request needs it
    if site is not None:  # the others wait to share the cores with the targeted trainings
        runs, later = runs[: -(-seeds // jobs) * jobs], runs[-(-seeds // jobs) * jobs:]
    train = functools.partial(train_runs, ws, trainer=trainer, epochs=epochs, iterations=iterations, device=device,
                              mirroring=mirroring, jobs=jobs, batch_size=batch_size)
    train(runs)
    if site is not None:
        request, cases = select_targeted(ws, per_mask=per_mask, verbatim=verbatim_masks)
        progress.info(f"[evaluate] targeted cases (below the real-only mean validation Dice): {', '.join(cases)}; "
                   f"request {request} -> site")
        release = Path(site(request))
        progress.info(f"[evaluate] training real+targeted on the site's release {release}")
        prepare_workspace(ws, real, targeted=release, configuration=configuration, arms=["real+targeted"])
        set_seeds(ws, seeds)
        train(later + [("real+targeted", s) for s in range(seeds)])
    return write_report(ws)
