"""Two training processes (CPU, gloo) through torchrun: different patches per rank, one writer of
the run dir and metrics, DeepSpeed's collective checkpoint, and a resumed 2-process run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medsyn_site.diffusion import engine as eng
from medsyn_site.diffusion.rundir import RunDir, checkpoint_problem
from medsyn_site.diffusion.train import rank_samples

CONFIG = Path(__file__).parent / "configs" / "train_test.yaml"
ZERO1 = Path(__file__).parent / "configs" / "deepspeed_zero1_cpu.json"


def test_ranks_draw_different_patches():
    one = rank_samples(0, 6, 2, 1, 0)
    two = [rank_samples(0, 3, 2, 2, r) for r in (0, 1)]
    assert not set(two[0]) & set(two[1])
    assert sorted(two[0] + two[1]) == one  # two ranks together draw what one process draws in as many patches
    assert rank_samples(2, 3, 2, 2, 1) == two[1][4:]  # a resumed rank continues its own sequence


def test_srun_variables_become_torch_ranks(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS",
              "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(k, "")  # recorded, so the ranks set below are undone after the test (a later
        monkeypatch.delenv(k)      # in-process training would otherwise wait for 4 ranks)
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

    monkeypatch.delenv("RANK")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # srun --gpus-per-task 1: the task's one GPU is cuda:0
    eng._ranks_from_slurm()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("3", "0")


RECORDER = Path(__file__).parent / "record_patches.py"


def _torchrun(args, config, seen):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MEDSYN_SOLO_DIST")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MEDSYN_TEST_SEEN=str(seen))
    seen.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(RECORDER), "train", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=1200, env=env)


def _patches(seen: Path, rank: int) -> list[tuple[int, str, str]]:
    """(index, case, image sum) of the training patches (dataset seed 0; previews use seed 1)."""
    rows = [line.split() for line in (seen / f"rank{rank}.txt").read_text().splitlines()]
    return [(int(i), case, total) for seed, i, case, total in rows if seed == "0"]


@pytest.mark.slow
def test_two_processes_train_and_resume(phantom_cohort, tmp_path):
    """torchrun, 2 CPU ranks (gloo), ZeRO stage 1: each rank holds its own optimizer shard."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["train"].update(deepspeed_config=str(ZERO1), log_every=3)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run, seen = tmp_path / "run", tmp_path / "seen"
    proc = _torchrun(["--cohort", str(phantom_cohort), "--out", str(run), "--steps", "4"], config, seen)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # both ranks drew patches, different ones: together the first 4 x 2 x 2 of the sample sequence
    ranks = [_patches(seen, r) for r in (0, 1)]
    assert [len(p) for p in ranks] == [8, 8]
    assert sorted(i for p in ranks for i, _, _ in p) == list(range(16))
    assert {(c, s) for _, c, s in ranks[0]} != {(c, s) for _, c, s in ranks[1]}  # different crops, not only indices

    # one checkpoint: rank 0's model states, one optimizer shard per rank, the EMA, checksums of all
    assert RunDir(run).latest() == "step_00000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000004"]  # no temp left
    ckpt = run / "checkpoints" / "step_00000004"
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["SHA256SUMS", "ema.pt", "mp_rank_00_model_states.pt",
                     "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"], files
    assert len((ckpt / "SHA256SUMS").read_text().splitlines()) == 4
    assert checkpoint_problem(ckpt) is None
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3", "4"]  # one writer: no row twice
    first = torch.load(ckpt / "ema.pt", map_location="cpu")["ema"]

    # a resumed 2-process run continues: each rank goes on with its own part of the sequence
    for f in seen.iterdir():
        f.unlink()
    proc = _torchrun(["--cohort", str(phantom_cohort), "--out", str(run), "--steps", "7", "--resume"], config, seen)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [_patches(seen, r) for r in (0, 1)]
    assert sorted(i for p in ranks for i, _, _ in p) == list(range(16, 28))
    assert RunDir(run).latest() == "step_00000007"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3", "4", "6", "7"]
    later = torch.load(run / "checkpoints" / "step_00000007" / "ema.pt", map_location="cpu")["ema"]
    assert any(not torch.equal(first[k], later[k]) for k in first)  # it went on training
