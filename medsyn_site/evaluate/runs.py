"""One nnU-Net training of one arm with one seed: train (fold 0 = arm cases / real val cases),
predict the real test set, score it. Each is one command, so a Slurm array can run them in parallel;
a finished one (result.json) is skipped."""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np

from medsyn_site.atomic import atomic_write_text
from medsyn_site.evaluate.datasets import EvaluationError, apply_env, dataset_name, load_workspace, nnunet_env

log = logging.getLogger(__name__)
RESULT = "result.json"


def run_dir(ws: Path, arm: str, seed: int) -> Path:
    return Path(ws) / "runs" / arm.replace("+", "_").replace("@", "_n") / f"seed{seed}"


def _per_case(summary: dict) -> dict:
    """Per-case TP/FP/FN of label 1 from an nnU-Net summary.json, keyed by case id."""
    out = {}
    for row in summary["metric_per_case"]:
        case = Path(row["reference_file"]).name.removesuffix(".nii.gz")
        m = row["metrics"].get("1", row["metrics"].get(1))
        out[case] = {k: int(m[k]) for k in ("TP", "FP", "FN")} | {"nnunet_dice": m["Dice"]}
    return out


def detection_per_case(real_root: str | Path, pred_dir: Path) -> dict:
    """Nodule-level detection of every predicted test case against the real cohort's masks."""
    import SimpleITK as sitk

    from medsyn_site.data.cohort import Cohort
    from medsyn_site.evaluate.detection import detect

    real = Cohort(real_root)
    out = {}
    for rec in real.split("test"):
        pred = pred_dir / f"{rec.id}.nii.gz"
        if pred.is_file():
            gt = real.arrays(rec.id)[1]
            out[rec.id] = detect(gt, sitk.GetArrayFromImage(sitk.ReadImage(str(pred))), rec.spacing[::-1], rec.nodules)
    return out


def train_one(ws: str | Path, arm: str, seed: int, trainer: str = "nnUNetTrainer_medsyn", epochs: int = 2,
              iterations: int = 5, device: str = "cpu", force: bool = False, resume: bool = False,
              mirroring: bool = True, batch_size: int | None = None) -> Path:
    """Train, predict and score one (arm, seed); returns its result.json. ``resume``: continue from
    nnU-Net's latest checkpoint (after a kill or preemption, or to train a finished run to more epochs).
    ``mirroring``: nnU-Net's test-time mirroring (its default) when predicting the test cases (and,
    with nnUNetTrainer_medsyn, the validation cases). ``batch_size``: replaces the plans' batch size
    (nnUNetTrainer_medsyn; part of the budget: more, cheaper iterations on a CPU)."""
    import os

    ws = Path(ws)
    state = load_workspace(ws)
    if arm not in state["arms"]:
        raise EvaluationError(f"{ws / 'workspace.json'}: arm {arm!r} was not prepared (have {state['arms']})")
    out = run_dir(ws, arm, seed)
    if (out / RESULT).exists() and not (force or resume):
        return out / RESULT
    apply_env(nnunet_env(ws, out / "nnUNet_results"))
    if device == "cpu":  # augmentation in the training process: faster on a few cores, and seeded runs repeat
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    name, config = dataset_name(arm), state["configuration"]
    t0 = time.time()
    # nnU-Net's run_training (one process), with the schedule set on the trainer object in between
    nnunet = get_trainer_from_args(name, config, 0, trainer, continue_training=resume, device=torch.device(device))
    if hasattr(nnunet, "set_budget"):
        nnunet.set_budget(epochs, iterations, batch_size, mirroring)
    else:
        log.warning("%s has its own schedule: --epochs/--iterations/--batch-size do not apply", trainer)
    maybe_load_checkpoint(nnunet, resume, False)
    nnunet.run_training()
    nnunet.perform_actual_validation(False)
    model = out / "nnUNet_results" / name / f"{trainer}__nnUNetPlans__{config}"
    predictor = nnUNetPredictor(use_mirroring=mirroring, perform_everything_on_device=False,
                                device=torch.device(device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    raw = ws / "nnUNet_raw" / name
    predictor.predict_from_files(str(raw / "imagesTs"), str(out / "pred_test"), num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
    compute_metrics_on_folder_simple(str(raw / "labelsTs"), str(out / "pred_test"), labels=[1],
                                     output_file=str(out / "summary_test.json"), num_processes=1)
    test = json.loads((out / "summary_test.json").read_text())
    val = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    result = {"arm": arm, "seed": seed, "trainer": trainer, "epochs": epochs, "iterations": iterations,
              "batch_size": batch_size,
              "configuration": config, "mirroring": mirroring, "seconds": round(time.time() - t0, 1),
              "test": _per_case(test), "val": _per_case(val),
              "detection": detection_per_case(state["real"], out / "pred_test"),
              "pred_test": str(out / "pred_test"), "pred_val": str(model / "fold_0" / "validation")}
    return atomic_write_text(out / RESULT, json.dumps(result, indent=1))
