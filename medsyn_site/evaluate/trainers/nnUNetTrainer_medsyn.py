"""A short nnU-Net trainer for CPU tests and the demo, found by nnU-Net through nnUNet_extTrainer.

As nnU-Net's own nnUNetTrainer_5epochs etc., it only overrides the schedule: epochs, iterations per
epoch and validation iterations come from MEDSYN_NNUNET_EPOCHS / _ITERS / _VAL_ITERS (set by
``medsyn evaluate train``), so one class serves every size; it checkpoints every epoch; and its final
validation predicts without test-time mirroring when MEDSYN_NNUNET_MIRRORING=0 (``--no-mirroring``,
as the test predictions; training augmentation keeps its mirroring).
"""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_medsyn(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("MEDSYN_NNUNET_EPOCHS", "2"))
        self.num_iterations_per_epoch = int(os.environ.get("MEDSYN_NNUNET_ITERS", "5"))
        self.num_val_iterations_per_epoch = int(os.environ.get("MEDSYN_NNUNET_VAL_ITERS", "2"))
        if os.environ.get("MEDSYN_NNUNET_BATCH"):  # plans' batch size, overridden (the budget, not the method)
            self.configuration_manager.configuration["batch_size"] = int(os.environ["MEDSYN_NNUNET_BATCH"])
        self.save_every = 1  # checkpoint_latest every epoch, so `medsyn evaluate train --resume` loses little

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("MEDSYN_NNUNET_MIRRORING", "1") == "0":
            self.inference_allowed_mirroring_axes = None  # checkpoint_final is already written
        super().perform_actual_validation(save_probabilities)
