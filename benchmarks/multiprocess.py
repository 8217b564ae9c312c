"""Two CPU training processes (torchrun, gloo) against one: training patches per second at the same
per-process batch (configs/tiny.yaml, its phantom cohort), and wall and CPU time of each command.

    .venv/bin/python benchmarks/multiprocess.py --steps 30 --out benchmarks/multiprocess_cpu.json

The rate is the trainer's own (metrics.csv ``patches_per_s``: all ranks' patches per second of the
training loop), averaged over the logged intervals after the first (start-up, first steps).
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _common import report
from medsyn_site.config import CONFIG_DIR, load_config
from medsyn_site.data.phantom import write_phantom_cohort


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(name: str, procs: int, threads: int, steps: int, cohort: Path, tmp: Path) -> dict:
    cfg = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    cfg["train"].update(threads=threads, log_every=max(steps // 3, 1), preview_every=10 ** 6, checkpoint_every=10 ** 6)
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp / name
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] \
        if procs > 1 else [sys.executable]
    cmd = [*launch, "-m", "medsyn_site.cli", "train", "--config", str(config), "--cohort", str(cohort),
           "--out", str(out), "--steps", str(steps), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    c0, t0 = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["patches_per_s"]) for r in rows[1:]]
    return {"name": name, "processes": procs, "threads_per_process": threads,
            "batch_per_process": cfg["train"]["batch_size"], "steps": steps,
            "patches_per_s": sum(rates) / len(rates), "wall_s": wall, "cpu_s": cpu,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(CONFIG_DIR / "tiny.yaml")
        # 4 cases: the rate does not depend on the cohort's size (volumes are read once, in memory)
        write_phantom_cohort(cfg.data.phantom.model_copy(update={"cases": 4}), cfg.data.split, tmp / "cohort")
        rows = [run("1proc_1thread", 1, 1, args.steps, tmp / "cohort", tmp),
                run("1proc_2threads", 1, 2, args.steps, tmp / "cohort", tmp),
                run("2procs_1thread", 2, 1, args.steps, tmp / "cohort", tmp)]
    base = rows[0]["patches_per_s"]
    result = {"cores": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
              "runs": [{k: v for k, v in r.items() if k != "rows"} | {"speedup_vs_1proc_1thread": r["patches_per_s"] / base}
                       for r in rows],
              "rows": {r["name"]: r["rows"] for r in rows}}
    report(result, args.out)


if __name__ == "__main__":
    main()
