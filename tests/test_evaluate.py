"""The utility evaluator end to end with real nnU-Net v2 on the CPU: all four arms, K = 2, the short
trainer, targeted selection and sampling, the report; and its refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from medsyn_site.config import PhantomConfig, SplitConfig
from medsyn_site.data.cohort import Cohort, image_path, mask_path
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.evaluate.datasets import EvaluationError, dataset_name, prepare_workspace
from medsyn_site.evaluate.pipeline import run_all
from medsyn_site.evaluate.report import write_report
from medsyn_site.evaluate.runs import run_dir


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "real"
    write_phantom_cohort(PhantomConfig(cases=10, seed=9, shape=(64, 64, 32)), SplitConfig(), out)
    return out


@pytest.fixture(scope="module")
def evaluated(real, synth, run, key, tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("eval") / "ws"
    run_all(real, synth, ws, seeds=2, epochs=1, iterations=3, configuration="2d", run=run, steps=2, site_key=key)
    return ws


def test_end_to_end_all_arms(evaluated, real):
    ws = evaluated
    rep = json.loads((ws / "report" / "report.json").read_text())
    arms = {r["arm"]: r for r in rep["arms"]}
    assert set(arms) == {"real", "synthetic", "real+synthetic", "real+targeted"} and rep["missing"] == []
    for name, row in arms.items():
        assert row["trainings"] == 2 and row["seeds"] == [0, 1]
        assert 0.0 <= row["dice_mean"] <= 1.0 and len(row["per_training"]) == 2
        if name != "real":
            assert 0.0 <= row["p_vs_real"] <= 1.0 and 0.0 <= row["wilcoxon_p_vs_real"] <= 1.0
            lo, hi = row["diff_vs_real_ci95"]
            assert lo <= hi
    md = (ws / "report" / "report.md").read_text()
    assert "| arm | trainings | test Dice" in md and "empty ground truth" in md
    for fig in ("dice_per_training.png", "dice_change.png", "examples.png"):
        assert (ws / "report" / fig).stat().st_size > 5000
    # the targeted request: validation cases only, below the real-only mean
    req = json.loads((ws / "targeted_request.json").read_text())
    cohort = Cohort(real)
    val, test = {c.id for c in cohort.split("val")}, {c.id for c in cohort.split("test")}
    assert req["cases"] and set(req["cases"]) <= val
    # one split: the same real val cases everywhere; synthetic only in training; test never trained on
    for arm in arms:
        split = json.loads((ws / "nnUNet_preprocessed" / dataset_name(arm) / "splits_final.json").read_text())
        assert set(split[0]["val"]) == val and not set(split[0]["train"]) & (val | test)
        trained = {p.name.removesuffix("_0000.nii.gz") for p in (ws / "nnUNet_raw" / dataset_name(arm) / "imagesTr").iterdir()}
        assert not trained & test
        if arm != "real":
            assert any(c.startswith("syn-") for c in split[0]["train"])
    assert not any(c.startswith("syn-") for c in json.loads(
        (ws / "nnUNet_preprocessed" / dataset_name("real") / "splits_final.json").read_text())[0]["train"])
    # each training is its own results folder with nnU-Net's checkpoint
    for arm in arms:
        for seed in (0, 1):
            assert list(run_dir(ws, arm, seed).rglob("checkpoint_final.pth"))


def test_report_says_what_is_missing(evaluated, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(evaluated, ws, symlinks=True)
    (run_dir(ws, "synthetic", 1) / "result.json").unlink()
    rep = write_report(ws)
    assert ["synthetic", 1] in [list(m) for m in rep["missing"]]
    assert "Missing trainings" in (ws / "report" / "report.md").read_text()


def test_refuses_synthetic_overlapping_the_test_set(real, synth, tmp_path):
    leaky = tmp_path / "leaky"
    shutil.copytree(synth, leaky)
    test_case = Cohort(real).split("test")[0]
    victim = Cohort(leaky).cases[0].id
    shutil.copy(image_path(real, test_case.id), image_path(leaky, victim))
    doc = json.loads((leaky / "cohort.json").read_text())
    doc["cases"][0]["sha256"]["image"] = test_case.sha256["image"]
    (leaky / "cohort.json").write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match=f"identical to real test case '{test_case.id}'"):
        prepare_workspace(tmp_path / "ws", real, leaky, configuration="2d")
    doc["cases"][0]["id"] = test_case.id
    (leaky / "cohort.json").write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match="has the id of a real test case"):
        prepare_workspace(tmp_path / "ws2", real, leaky, configuration="2d")


def test_refuses_a_dataset_that_fails_nnunet_integrity(real, synth, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(synth, bad)
    case = Cohort(bad).cases[0].id
    m = sitk.ReadImage(str(mask_path(bad, case)))
    arr = sitk.GetArrayFromImage(m)
    arr[0, 0, 0] = 3  # a label dataset.json does not declare
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(m)
    sitk.WriteImage(new, str(mask_path(bad, case)), useCompression=True)
    with pytest.raises(EvaluationError, match="fails nnU-Net's dataset integrity check"):
        prepare_workspace(tmp_path / "ws", real, bad, configuration="2d", arms=["synthetic"])


def test_resume_trains_on_from_the_checkpoint(evaluated, tmp_path):
    """`medsyn evaluate train --resume`: nnU-Net continues from its checkpoint (here: a finished
    1-epoch training taken on to 2 epochs) instead of starting again."""
    import subprocess
    import sys

    ws = tmp_path / "ws"
    shutil.copytree(evaluated, ws, symlinks=True)
    fold = next(run_dir(ws, "real", 0).rglob("fold_0"))
    before = set(fold.glob("training_log*.txt"))
    done = subprocess.run([sys.executable, "-m", "medsyn_site.cli", "evaluate", "train", "--ws", str(ws), "--arm",
                           "real", "--seed", "0", "--epochs", "2", "--iterations", "3", "--resume"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (log,) = set(fold.glob("training_log*.txt")) - before
    text = log.read_text()
    assert "Epoch 1" in text and "Epoch 0" not in text
    result = json.loads((run_dir(ws, "real", 0) / "result.json").read_text())
    assert result["epochs"] == 2 and result["test"]
