"""Short-schedule trainers of the demo: the same schedule for the labeled-only baseline and for BCP.

Schedule from the environment (set by ``nnUNetv2_bcp_demo``): ``BCP_DEMO_EPOCHS`` (default 12),
``BCP_DEMO_ITERATIONS`` per epoch (default 20); BCP's stage 1 follows the schedule (the default half of the epochs).
"""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP


def _demo_schedule(trainer) -> None:
    trainer.num_epochs = int(os.environ.get("BCP_DEMO_EPOCHS", 12))
    trainer.num_iterations_per_epoch = int(os.environ.get("BCP_DEMO_ITERATIONS", 20))
    trainer.num_val_iterations_per_epoch = 5


class nnUNetTrainerDemo(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _demo_schedule(self)


class nnUNetTrainerBCPDemo(nnUNetTrainerBCP):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _demo_schedule(self)
