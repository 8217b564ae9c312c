"""The utility evaluator end to end with real nnU-Net v2 on the CPU: all four arms, K = 2, the short
trainer, targeted selection and sampling, the report (on the demo's evaluation, which learns); and
its refusals."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medsyn_site import provenance, request
from medsyn_site.config import PhantomConfig, SplitConfig
from medsyn_site.data.cohort import Cohort, image_path, mask_path
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.evaluate.datasets import EvaluationError, dataset_name, prepare_workspace
from medsyn_site.evaluate.report import write_report
from medsyn_site.evaluate.runs import run_dir
from medsyn_site.publish.release import ReleaseError
from medsyn_site.targeted import answer_request


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "real"
    write_phantom_cohort(PhantomConfig(cases=10, seed=9, shape=(64, 64, 32)), SplitConfig(), out)
    return out


def on_the_demo(test):
    """Slow tier: real nnU-Net trainings, from the whole demo's evaluation (the first such test runs the demo)."""
    return pytest.mark.timeout(3000)(pytest.mark.slow(test))


def copy_ws(ws: Path, dst: Path, keep_checkpoints_of: str | None = None) -> Path:
    """A copy of a workspace without nnU-Net's checkpoints (~150 MB each) but those of one run dir."""
    keep = str(ws / "runs" / keep_checkpoints_of) if keep_checkpoints_of else None

    def ignore(folder, names):
        return [n for n in names if n.endswith(".pth") and not (keep and folder.startswith(keep))]
    shutil.copytree(ws, dst, symlinks=True, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def evaluated(demo) -> Path:
    """The demo's evaluation: all four arms, the targeted one through the site's sample + publish
    (the site's outputs in DEMO/targeted, the demo's log in WS/log.txt)."""
    out, proc = demo
    ws = out / "evaluation"
    (ws / "log.txt").write_text(proc.stdout)
    return ws


@on_the_demo
def test_end_to_end_all_arms(evaluated):
    ws = evaluated
    real = ws.parent / "phantom"
    rep = json.loads((ws / "report" / "report.json").read_text())
    arms = {r["arm"]: r for r in rep["arms"]}
    assert set(arms) == {"real", "synthetic", "real+synthetic", "real+targeted"} and rep["missing"] == []
    k = len(json.loads((ws / "workspace.json").read_text())["seeds"])  # the demo trains each arm once
    for name, row in arms.items():
        assert row["trainings"] == k and row["seeds"] == list(range(k))
        assert 0.0 <= row["dice_mean"] <= 1.0 and len(row["per_training"]) == k
        if name != "real":  # the paired per-case test always; Welch's over trainings needs K >= 2
            assert 0.0 <= row["wilcoxon_p_vs_real"] <= 1.0 and (np.isnan(row["p_vs_real"]) == (k < 2))
            lo, hi = row["diff_vs_real_ci95"]
            assert lo <= hi
    md = (ws / "report" / "report.md").read_text()
    assert "| training data | cases | trainings | test Dice" in md and "empty ground truth" in md
    assert "Table 1" in md and "Nodule-level detection" in md and rep["conclusion"] in md
    # nodule-level detection for every arm, from its own predictions: every test nodule counted once
    # per training (nodules are 26-connected components of the masks, counted here independently)
    components = sum(ndimage.label(Cohort(real).arrays(c.id)[1], structure=np.ones((3, 3, 3)))[1]
                     for c in Cohort(real).split("test"))
    for name, row in arms.items():
        assert row["detection"]["all"]["of"] == k * components
    for fig in ("dice_per_training.png", "dice_change.png", "examples.png"):
        assert (ws / "report" / fig).stat().st_size > 5000
    # the targeted request: validation cases only, below the real-only mean, relocated masks
    req = request.read(ws / "targeted_request.json")
    cohort = Cohort(real)
    val, test = {c.id for c in cohort.split("val")}, {c.id for c in cohort.split("test")}
    assert req.cases and set(req.cases) <= val and req.mask_mode == "relocated"
    # the site sampled it (relocated masks, signed provenance) and published it; the central side
    # trained on the release: the real+targeted arm's synthetic cases are exactly the released ones
    site = ws.parent / "targeted"
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
        for seed in range(k):
            assert list(run_dir(ws, arm, seed).rglob("checkpoint_final.pth"))


@on_the_demo
def test_report_says_what_is_missing(evaluated, tmp_path):
    ws = copy_ws(evaluated, tmp_path / "ws")
    (run_dir(ws, "synthetic", 0) / "result.json").unlink()
    rep = write_report(ws)
    assert ["synthetic", 0] in [list(m) for m in rep["missing"]]
    assert "synthetic" not in {r["arm"] for r in rep["arms"]}
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


@on_the_demo
def test_resume_trains_on_from_the_checkpoint(evaluated, tmp_path):
    """`medsyn evaluate train --resume`: nnU-Net continues from its checkpoint (here: a finished
    training taken on by one more epoch) instead of starting again."""
    import subprocess
    import sys

    ws = copy_ws(evaluated, tmp_path / "ws", keep_checkpoints_of="real/seed0")
    fold = next(run_dir(ws, "real", 0).rglob("fold_0"))
    before = set(fold.glob("training_log*.txt"))
    epochs = json.loads((run_dir(ws, "real", 0) / "result.json").read_text())["epochs"]
    done = subprocess.run([sys.executable, "-m", "medsyn_site.cli", "evaluate", "train", "--ws", str(ws), "--arm",
                           "real", "--seed", "0", "--epochs", str(epochs + 1), "--iterations", "3", "--batch-size", "4",
                           "--no-mirroring", "--resume"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (log,) = set(fold.glob("training_log*.txt")) - before
    text = log.read_text()
    assert f"Epoch {epochs}" in text and "Epoch 0" not in text
    # the schedule reached the trainer object (set_budget): one more epoch of 3 iterations of 4
    assert f"Epoch {epochs + 1}" not in text and "'batch_size': 4" in text
    result = json.loads((run_dir(ws, "real", 0) / "result.json").read_text())
    assert result["epochs"] == epochs + 1 and result["test"] and result["detection"]


def test_site_answers_a_request_through_the_gate(run, phantom_cohort, key, tmp_path):
    """Verbatim masks only when the request asks and the site allows it; a request is its own contract."""
    val = Cohort(phantom_cohort).split("val")[0].id
    path = request.write(tmp_path / "req.json", request.Request(cases=[val], mask_mode="verbatim"))
    with pytest.raises(ReleaseError, match="verbatim real mask"):
        answer_request(path, run, tmp_path / "a", training_cohort=phantom_cohort, steps=2, site_key=key)
    assert not (tmp_path / "a" / "release").exists()
    # the default sampler's 10 steps: a 2-step sample of this 10-step fixture model is a blurred mean
    # image, which the audit's local search can refuse (windowed evaluation: local similarity 0.32 above
    # its 0.17 threshold while global similarity is ~0), and this test is about the verbatim gate
    nifti = answer_request(path, run, tmp_path / "b", training_cohort=phantom_cohort, site_key=key,
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


def test_a_hostile_request_is_bounded_by_the_site(run, phantom_cohort, key, tmp_path):
    """A request is another party's input: it cannot ask for a million volumes, and it cannot pick which
    of the site's folders is read; `--dry-run` shows what it would make. Through the CLI, as a site runs it."""
    val = Cohort(phantom_cohort).split("val")[0].id
    other = tmp_path / "private"  # a folder of the site the request must not reach
    shutil.copytree(phantom_cohort, other)
    medsyn = [sys.executable, "-m", "medsyn_site.cli"]

    def sample(req: request.Request, *extra):
        path = request.write(tmp_path / "req.json", req)
        return subprocess.run([*medsyn, "sample", "--run", str(run), "--masks", f"request:{path}", "--out",
                               str(tmp_path / "out"), "--site-key", str(key), *extra], capture_output=True, text=True)

    huge = sample(request.Request(cases=[val], per_mask=1_000_000), "--request-cohort", str(phantom_cohort))
    assert huge.returncode != 0 and not (tmp_path / "out").exists()
    last = huge.stderr.strip().splitlines()[-1]
    assert "req.json: asks for 1000000 volumes" in last and "limit of 500 per request (--max-volumes)" in last, last
    assert sample(request.Request(cases=[val], per_mask=3), "--request-cohort", str(phantom_cohort),
                  "--max-volumes", "2").returncode != 0
    # the request names a folder; the site did not: refused, and the named folder is never read
    named = sample(request.Request(cases=[val], cohort=str(other)))
    assert named.returncode != 0 and "--request-cohort DIR" in named.stderr and not (tmp_path / "out").exists()
    dry = sample(request.Request(cases=[val], per_mask=2, cohort=str(other)), "--request-cohort", str(phantom_cohort),
                 "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would sample 2 volume(s)" in dry.stdout and str(phantom_cohort) in dry.stdout and str(other) not in dry.stdout
    assert val in dry.stdout and not (tmp_path / "out").exists()
