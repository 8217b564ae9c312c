"""The utility evaluator end to end with real nnU-Net v2 on the CPU: all four arms, K = 2, the short
trainer, targeted selection and sampling, the report; and its refusals."""
from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from medsyn_site import provenance, request
from medsyn_site.config import PhantomConfig, SplitConfig
from medsyn_site.data.cohort import Cohort, image_path, mask_path
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.evaluate.datasets import EvaluationError, dataset_name, prepare_workspace
from medsyn_site.evaluate.pipeline import run_all
from medsyn_site.evaluate.report import write_report
from medsyn_site.evaluate.runs import run_dir
from medsyn_site.publish.release import ReleaseError
from medsyn_site.targeted import answer_request


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "real"
    write_phantom_cohort(PhantomConfig(cases=10, seed=9, shape=(64, 64, 32)), SplitConfig(), out)
    return out


@pytest.fixture(scope="module")
def evaluated(real, synth, run, phantom_cohort, key, tmp_path_factory) -> Path:
    """All four arms; the targeted one through the site's sample + publish (its log in WS/log.txt)."""
    ws = tmp_path_factory.mktemp("eval") / "ws"
    site = functools.partial(answer_request, run=run, out=ws.parent / "site", training_cohort=phantom_cohort,
                             steps=2, site_key=key)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run_all(real, synth, ws, seeds=2, epochs=1, iterations=3, configuration="2d", site=site)
    (ws / "log.txt").write_text(log.getvalue())
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
    # the targeted request: validation cases only, below the real-only mean, relocated masks
    req = request.read(ws / "targeted_request.json")
    cohort = Cohort(real)
    val, test = {c.id for c in cohort.split("val")}, {c.id for c in cohort.split("test")}
    assert req.cases and set(req.cases) <= val and req.mask_mode == "relocated"
    # the site sampled it (relocated masks, signed provenance) and published it; the central side
    # trained on the release: the real+targeted arm's synthetic cases are exactly the released ones
    site = ws.parent / "site"
    _, entries = provenance.read(site / "synthetic")
    assert len(entries) == len(req.cases) and {e["mask_mode"] for e in entries} == {"relocated"}
    released = {c.id for c in Cohort(site / "release" / "nifti").cases}
    assert released and (site / "release" / "audit" / "privacy.md").is_file()
    split = json.loads((ws / "nnUNet_preprocessed" / dataset_name("real+targeted") / "splits_final.json").read_text())
    assert {c for c in split[0]["train"] if c.startswith("syn-")} == released
    log = (ws / "log.txt").read_text()
    assert f"[site] published {len(released)}/{len(entries)} targeted case(s) through `medsyn publish`" in log
    assert all(f"[site] publish {c}: released" in log for c in released)
    # the gain is reported on the test split; the targeted cases' own Dice is not counted
    assert "Gain of real+targeted over real on the test split" in md
    assert "not counted" in md
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


def test_site_answers_a_request_through_the_gate(run, phantom_cohort, key, tmp_path):
    """Verbatim masks only when the request asks and the site allows it; a request is its own contract."""
    val = Cohort(phantom_cohort).split("val")[0].id
    path = request.write(tmp_path / "req.json", request.Request(cases=[val], mask_mode="verbatim"))
    with pytest.raises(ReleaseError, match="verbatim real mask"):
        answer_request(path, run, tmp_path / "a", training_cohort=phantom_cohort, steps=2, site_key=key)
    assert not (tmp_path / "a" / "release").exists()
    nifti = answer_request(path, run, tmp_path / "b", training_cohort=phantom_cohort, steps=2, site_key=key,
                           allow_verbatim=True)
    (case,) = Cohort(nifti).cases
    card = json.loads((nifti.parent / "dataset_card.json").read_text())
    assert card["verbatim_real_masks"] is True and card["mask_source"] == "request"
    # bad requests: one line naming the file and the problem
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": request.FORMAT, "cases": [val], "per_mask": 0}))
    with pytest.raises(request.RequestError, match=r"bad.json: per_mask: .*greater than or equal to 1"):
        request.read(bad)
    bad.write_text(json.dumps({"format": request.FORMAT, "cases": ["nobody"], "cohort": str(phantom_cohort)}))
    with pytest.raises(Exception, match="no case 'nobody'"):
        answer_request(bad, run, tmp_path / "c", training_cohort=phantom_cohort, steps=2, site_key=key)


def test_evaluator_does_not_import_the_generator():
    code = ("import sys, medsyn_site.evaluate.pipeline, medsyn_site.evaluate.report, medsyn_site.evaluate.runs; "
            "print([m for m in sys.modules if m.startswith('medsyn_site.diffusion')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
