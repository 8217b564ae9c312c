"""A short nnU-Net trainer for CPU tests, the demo and the benchmarks, found by nnU-Net through
nnUNet_extTrainer.

As nnU-Net's own nnUNetTrainer_5epochs etc., it only changes the schedule, not the method; one class
serves every budget because the schedule is set on the trainer object before it trains
(``set_budget``, called by ``medsyn evaluate train``): epochs, iterations per epoch, the plans' batch
size and whether the final validation predicts with test-time mirroring (training augmentation keeps
its mirroring). It checkpoints every epoch. Run by ``nnUNetv2_train -tr nnUNetTrainer_medsyn`` it
trains the smoke-test schedule below.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_medsyn(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1  # checkpoint_latest every epoch, so `medsyn evaluate train --resume` loses little
        self.set_budget(epochs=2, iterations=5)

    def set_budget(self, epochs: int, iterations: int, batch_size: int | None = None, mirroring: bool = True) -> None:
        """The schedule; before ``initialize`` (which reads the batch size), i.e. before a checkpoint loads."""
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations
        self.num_val_iterations_per_epoch = max(1, iterations // 5)
        if batch_size:  # the plans' batch size, overridden (the budget, not the method)
            self.configuration_manager.configuration["batch_size"] = batch_size
        self.validation_mirroring = mirroring

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not self.validation_mirroring:
            self.inference_allowed_mirroring_axes = None  # checkpoint_final is already written
        super().perform_actual_validation(save_probabilities)
