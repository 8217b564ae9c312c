"""nnU-Net v2 raw datasets for the arms, one fixed patient-level split, and planning/preprocessing.

Workspace layout (WS):
  workspace.json                     inputs, arms, nnU-Net settings
  nnUNet_raw/Dataset50N_medsyn_<arm> imagesTr, labelsTr (arm training cases + the real val cases),
                                     imagesTs, labelsTs (the real test cases), dataset.json
  nnUNet_preprocessed/...            nnU-Net's plans; splits_final.json fixes fold 0 = (arm train, real val)
  runs/<arm>/seed<k>/                one training each (see runs.py)
The real validation cases are the same in every arm; synthetic cases appear in training folds only;
the real test set is never trained on nor used to pick targeted cases.

The low-data curve: an arm ``real@N`` / ``real+synthetic@N`` trains on N of the real training cases
(nested subsets: the first N of one fixed shuffled order) and, for the latter, the whole synthetic set.
It answers "how many real cases is the synthetic data worth?".
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from medsyn_site.atomic import atomic_write_text, sha256_file
from medsyn_site.data.cohort import Cohort, image_path, mask_path, release_problems
from medsyn_site.errors import MedsynError

ARMS = {"real": 501, "synthetic": 502, "real+synthetic": 503, "real+targeted": 504}
TRAINER_DIR = Path(__file__).parent / "trainers"


class EvaluationError(MedsynError):
    """The evaluation cannot go ahead; the message names the file or dataset and the problem."""


SUBSET_ARMS = ("real", "real+synthetic")  # the arms of the low-data curve


def parse_arm(arm: str) -> tuple[str, int | None]:
    """'real+synthetic@8' -> ('real+synthetic', 8); 'real' -> ('real', None)."""
    base, _, n = arm.partition("@")
    if base not in ARMS or (n and (base not in SUBSET_ARMS or not n.isdigit() or int(n) < 1)):
        raise EvaluationError(f"unknown arm {arm!r}: one of {', '.join(ARMS)}, or {' / '.join(SUBSET_ARMS)}@N "
                              "(N real training cases)")
    return base, int(n) if n else None


def subset_arms(sizes) -> list[str]:
    return [f"{base}@{n}" for n in sorted(sizes) for base in SUBSET_ARMS]


def dataset_id(arm: str) -> int:
    """nnU-Net dataset id: 501-504 for the four arms, 513 + 4N + k for the low-data arm k at size N."""
    base, n = parse_arm(arm)
    did = ARMS[base] if n is None else ARMS[base] + 12 + 4 * n
    if did > 999:
        raise EvaluationError(f"arm {arm!r}: at most 121 real cases in a low-data arm (nnU-Net ids end at 999)")
    return did


def dataset_name(arm: str) -> str:
    return f"Dataset{dataset_id(arm)}_medsyn_{arm.replace('+', '_').replace('@', '_n')}"


def real_subset(real: Cohort, n: int) -> list[str]:
    """The first n real training cases of one fixed shuffled order (so 4 of them lie inside 8)."""
    import numpy as np

    ids = sorted(c.id for c in real.split("train"))
    if n > len(ids):
        raise EvaluationError(f"{real.root}: a low-data arm of {n} real cases, but the cohort has {len(ids)} "
                              "training cases")
    order = np.random.default_rng(0).permutation(len(ids))
    return [ids[i] for i in order[:n]]


def nnunet_env(ws: Path, results: Path | None = None) -> dict:
    """Environment for nnU-Net in this workspace (set before nnunetv2 is imported)."""
    env = {"nnUNet_raw": str(ws / "nnUNet_raw"), "nnUNet_preprocessed": str(ws / "nnUNet_preprocessed"),
           "nnUNet_results": str(results or ws / "nnUNet_results"), "nnUNet_extTrainer": str(TRAINER_DIR),
           "nnUNet_def_n_proc": "1", "nnUNet_compile": "false"}
    return env


def apply_env(env: dict) -> None:
    os.environ.update(env)


@dataclass
class Inputs:
    real: Cohort
    synthetic: Cohort | None
    targeted: Cohort | None

    def arm_cases(self, arm: str) -> list[tuple[Cohort, str]]:
        arm, n = parse_arm(arm)
        real_train = [(self.real, c.id) for c in self.real.split("train")]
        if n is not None:
            real_train = [(self.real, cid) for cid in real_subset(self.real, n)]
        syn = [(self.synthetic, c.id) for c in self.synthetic.cases] if self.synthetic else []
        tgt = [(self.targeted, c.id) for c in self.targeted.cases] if self.targeted else []
        return {"real": real_train, "synthetic": syn, "real+synthetic": real_train + syn,
                "real+targeted": real_train + tgt}[arm]

    def available_arms(self) -> list[str]:
        have = {"real": True, "synthetic": self.synthetic is not None,
                "real+synthetic": self.synthetic is not None, "real+targeted": self.targeted is not None}
        return [a for a in ARMS if have[a]]


def check_no_test_leak(real: Cohort, other: Cohort) -> None:
    """Refuse a synthetic set that shares an id or a file with the real test set. The files
    themselves are hashed: the sha256 listed in a cohort.json may be stale or edited."""
    test = real.split("test")
    ids = {c.id for c in test}
    shas = {sha256_file(image_path(real.root, c.id)): c.id for c in test if image_path(real.root, c.id).is_file()}
    for rec in other.cases:
        if rec.id in ids:
            raise EvaluationError(f"{other.root}: case {rec.id!r} has the id of a real test case")
        path = image_path(other.root, rec.id)
        digest = sha256_file(path) if path.is_file() else None
        if digest in shas:
            raise EvaluationError(f"{path}: identical to real test case {shas[digest]!r} (same sha256)")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_arm(ws: Path, arm: str, inputs: Inputs) -> Path:
    """Write the arm's raw dataset (hard links to the cohort files) and return its folder."""
    root = ws / "nnUNet_raw" / dataset_name(arm)
    if root.exists():
        shutil.rmtree(root)
    train = inputs.arm_cases(arm)
    val = [(inputs.real, c.id) for c in inputs.real.split("val")]
    test = [(inputs.real, c.id) for c in inputs.real.split("test")]
    if not val or not test:
        raise EvaluationError(f"{inputs.real.root}: the real cohort needs val and test cases")
    for cohort, cid in train + val:
        _link(image_path(cohort.root, cid), root / "imagesTr" / f"{cid}_0000.nii.gz")
        _link(mask_path(cohort.root, cid), root / "labelsTr" / f"{cid}.nii.gz")
    for cohort, cid in test:
        _link(image_path(cohort.root, cid), root / "imagesTs" / f"{cid}_0000.nii.gz")
        _link(mask_path(cohort.root, cid), root / "labelsTs" / f"{cid}.nii.gz")
    atomic_write_text(root / "dataset.json", json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "nodule": 1},
        "numTraining": len(train) + len(val), "file_ending": ".nii.gz",
        "name": dataset_name(arm), "description": f"medsyn utility arm {arm}"}, indent=1))
    return root


def write_split(ws: Path, arm: str, inputs: Inputs) -> Path:
    """splits_final.json: fold 0 trains on the arm's cases and validates on the real val cases."""
    path = ws / "nnUNet_preprocessed" / dataset_name(arm) / "splits_final.json"
    split = [{"train": [cid for _, cid in inputs.arm_cases(arm)],
              "val": [c.id for c in inputs.real.split("val")]}]
    return atomic_write_text(path, json.dumps(split, indent=1))


def plan_and_preprocess(ws: Path, arm: str, configuration: str) -> None:
    """nnU-Net's fingerprint (with --verify_dataset_integrity), plans and preprocessing."""
    apply_env(nnunet_env(ws))
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    did = dataset_id(arm)
    try:
        extract_fingerprints([did], num_processes=1, check_dataset_integrity=True, verbose=False)
    except (AssertionError, RuntimeError, ValueError) as e:
        raise EvaluationError(f"{ws / 'nnUNet_raw' / dataset_name(arm)}: fails nnU-Net's dataset integrity "
                              f"check: {e}") from e
    plan_experiments([did])
    preprocess([did], configurations=(configuration,), num_processes=(1,), verbose=False)


def prepare_workspace(ws: str | Path, real: str | Path, synthetic: str | Path | None = None,
                      targeted: str | Path | None = None, configuration: str = "3d_fullres",
                      arms: list[str] | None = None, real_sizes=()) -> list[str]:
    """Export, split and preprocess every arm the inputs allow (or those asked for), plus the
    low-data arms at each of ``real_sizes`` (real-only, and real + synthetic when it is given)."""
    ws = Path(ws)
    inputs = Inputs(Cohort(real), Cohort(synthetic) if synthetic else None, Cohort(targeted) if targeted else None)
    for other in (inputs.synthetic, inputs.targeted):
        if other is not None:
            check_no_test_leak(inputs.real, other)  # file hashes only: no voxel decoded
            problems = release_problems(other.root)  # another party's files: headers before any voxel is read
            if problems:
                raise EvaluationError(f"{problems[0]}" + (f" (and {len(problems) - 1} more problem(s) in {other.root})"
                                                           if len(problems) > 1 else "") + "; the release is not used")
    arms = list(arms or inputs.available_arms())
    arms += [a for a in subset_arms(real_sizes) if parse_arm(a)[0] in inputs.available_arms()]
    for arm in arms:
        if parse_arm(arm)[1] is not None:
            real_subset(inputs.real, parse_arm(arm)[1])  # refuse a size the cohort does not have, first
    missing = [a for a in arms if parse_arm(a)[0] not in inputs.available_arms()]
    if missing:
        raise EvaluationError(f"arm(s) {missing} need inputs that were not given")
    ws.mkdir(parents=True, exist_ok=True)
    state_path = ws / "workspace.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"arms": []}
    state.update({"real": str(Path(real).resolve()), "configuration": configuration})
    if synthetic:
        state["synthetic"] = str(Path(synthetic).resolve())
    if targeted:
        state["targeted"] = str(Path(targeted).resolve())
    for arm in arms:
        export_arm(ws, arm, inputs)
        plan_and_preprocess(ws, arm, configuration)
        write_split(ws, arm, inputs)
        if arm not in state["arms"]:
            state["arms"].append(arm)
    atomic_write_text(state_path, json.dumps(state, indent=1))
    return arms


def load_workspace(ws: str | Path) -> dict:
    path = Path(ws) / "workspace.json"
    if not path.is_file():
        raise EvaluationError(f"{path}: not an evaluation workspace (run `medsyn evaluate prepare` first)")
    return json.loads(path.read_text())
