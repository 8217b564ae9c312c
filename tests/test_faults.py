"""kill -9 at chosen points of `medsyn sample` and `medsyn train` (while a file or a checkpoint is
being written), then the documented recovery (run the same command again; `train --resume`), then
`medsyn data validate`, and the result compared with an uninterrupted run.

The kill is real (SIGKILL to the process itself) and placed exactly: a small driver patches one
function at the OS/library boundary to kill the process the n-th time it is reached."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medsyn_site.diffusion.rundir import RunDir, checkpoint_problem

from test_train import _assert_same, _final_state

TRAIN_CFG = str(Path(__file__).parent / "configs" / "train_test.yaml")

DRIVER = r'''
import os, signal, sys
point, argv = sys.argv[1], sys.argv[2:]
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def halve(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])

if point.startswith("image-write:"):  # the n-th NIfTI half written to its temp file
    import SimpleITK as sitk
    real, n = sitk.WriteImage, int(point.split(":")[1])
    def write(img, path, *a, **kw):
        real(img, path, *a, **kw)
        calls["n"] += 1
        if calls["n"] == n:
            halve(str(path)); die()
    sitk.WriteImage = write
elif point.startswith("case-written:"):  # a case's files in place, its progress line not yet
    from medsyn_site.data.cohort import ResumableCohortWriter
    n = int(point.split(":")[1])
    def added(self, rec):
        calls["n"] += 1
        if calls["n"] == n:
            die()
        return real_added(self, rec)
    real_added = ResumableCohortWriter._added
    ResumableCohortWriter._added = added
elif point == "provenance":  # every volume written, provenance.json not yet
    import medsyn_site.provenance as prov
    prov.write = lambda *a, **kw: die()
elif point.startswith("checkpoint-file:"):  # the first file of checkpoint TAG half written
    import torch
    tag, real_save = point.split(":")[1], torch.save
    def save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        if tag in str(f):
            halve(str(f)); die()
    torch.save = save
elif point.startswith("before-latest:"):  # checkpoint TAG renamed into place, `latest` not updated
    import medsyn_site.diffusion.rundir as rd
    tag, real_write = point.split(":")[1], rd.atomic_write_text
    def write_text(path, text):
        if str(path).endswith("latest") and text == tag:
            die()
        return real_write(path, text)
    rd.atomic_write_text = write_text
else:
    raise SystemExit(f"unknown point {point}")
from medsyn_site.cli import main
main(argv, prog_name="medsyn")
'''


def _medsyn(args, point=None, **kw):
    cmd = [sys.executable, "-c", DRIVER, point, *args] if point else \
        [sys.executable, "-c", "from medsyn_site.cli import main; main(prog_name='medsyn')", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


def _cases(out: Path) -> dict:
    return {c["id"]: c["sha256"] for c in json.loads((out / "cohort.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def sample_args(run, phantom_cohort, key):
    return lambda out: ["sample", "--run", str(run), "--masks", f"cohort:{phantom_cohort}", "--out", str(out),
                        "--steps", "2", "--seed", "7", "--site-key", str(key)]


@pytest.fixture(scope="module")
def sample_reference(sample_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "syn"
    proc = _medsyn(sample_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", ["image-write:1", "image-write:4", "case-written:2", "provenance"])
def test_kill9_sample_then_rerun_and_validate(point, sample_args, sample_reference, tmp_path):
    out = tmp_path / "syn"
    killed = _medsyn(sample_args(out), point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "cohort.json").exists()  # unfinished, visibly
    again = _medsyn(sample_args(out))  # the documented recovery: the same command again
    assert again.returncode == 0, again.stderr[-3000:]
    valid = _medsyn(["data", "validate", str(out)])
    assert valid.returncode == 0, valid.stdout + valid.stderr[-3000:]
    assert _cases(out) == _cases(sample_reference)  # byte-identical volumes to an uninterrupted run
    assert (out / "provenance.json").read_bytes() == (sample_reference / "provenance.json").read_bytes()
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


@pytest.fixture(scope="module")
def train_reference(phantom_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _medsyn(["train", "--config", TRAIN_CFG, "--cohort", str(phantom_cohort), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point, recovery", [
    ("checkpoint-file:step_00000010", []),  # the first checkpoint: the same command again, no --force
    ("checkpoint-file:step_00000020", ["--resume"]),
    ("before-latest:step_00000020", ["--resume"]),
])
def test_kill9_train_then_recover(point, recovery, phantom_cohort, train_reference, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", TRAIN_CFG, "--cohort", str(phantom_cohort), "--out", str(out)]
    killed = _medsyn(args, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    again = _medsyn(args + recovery)
    assert again.returncode == 0, again.stderr[-3000:]
    run = RunDir(out)
    assert run.tags()[0] == "step_00000020" and all(checkpoint_problem(run.ckpt / t) is None for t in run.tags())
    _assert_same(_final_state(train_reference), _final_state(out))  # as if never killed
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    valid = _medsyn(["data", "validate", str(phantom_cohort)])  # the training data is untouched
    assert valid.returncode == 0, valid.stdout + valid.stderr[-3000:]
