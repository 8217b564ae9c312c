"""Two training processes (CPU, gloo) through torchrun: different patches per rank, one writer of
the run dir and metrics, DeepSpeed's collective checkpoint, and a resumed 2-process run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsyn_site.diffusion import engine as eng
from medsyn_site.diffusion.rundir import RunDir
from medsyn_site.diffusion.train import rank_samples

CONFIG = Path(__file__).parent / "configs" / "train_test.yaml"


def test_ranks_draw_different_patches():
    one = rank_samples(0, 6, 2, 1, 0)
    two = [rank_samples(0, 3, 2, 2, r) for r in (0, 1)]
    assert not set(two[0]) & set(two[1])
    assert sorted(two[0] + two[1]) == one  # two ranks together draw what one process draws in as many patches
    assert rank_samples(2, 3, 2, 2, 1) == two[1][4:]  # a resumed rank continues its own sequence


def test_srun_variables_become_torch_ranks(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS",
              "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NNODES", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: one node, so the rendezvous is local
    eng._ranks_from_slurm()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "1", "4")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == str(29500 + 1234)


def _torchrun(args, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MEDSYN_SOLO_DIST")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "medsyn_site.cli", "train", "--config", str(CONFIG), *args],
                          capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_two_processes_train_and_resume(phantom_cohort, tmp_path):
    run = tmp_path / "run"
    proc = _torchrun(["--cohort", str(phantom_cohort), "--out", str(run), "--steps", "10"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert RunDir(run).latest() == "step_00000010"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000010"]  # one checkpoint, no temp folders left
    files = sorted(p.name for p in (run / "checkpoints" / "step_00000010").iterdir())
    assert "ema.pt" in files and "mp_rank_00_model_states.pt" in files, files
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["5", "10"]  # one writer: no row twice
    first = torch.load(run / "checkpoints" / "step_00000010" / "ema.pt", map_location="cpu")["ema"]

    proc = _torchrun(["--cohort", str(phantom_cohort), "--out", str(run), "--steps", "20", "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert RunDir(run).latest() == "step_00000020"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["5", "10", "15", "20"]
    later = torch.load(run / "checkpoints" / "step_00000020" / "ema.pt", map_location="cpu")["ema"]
    assert any(not torch.equal(first[k], later[k]) for k in first)  # it went on training
