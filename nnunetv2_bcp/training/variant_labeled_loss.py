"""Variants of the supervised term: nnU-Net's loss on the un-mixed labeled patches beside the BCP loss in stage 2
(``bcp_labeled_loss_weight``, 1 by default: chosen on the label-scarce benchmark's validation cases;
docs/benchmarks.md)."""
import torch

from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP


class nnUNetTrainerBCP_referenceLoss(nnUNetTrainerBCP):
    """The paper's stage-2 loss alone, as the reference implementation computes it (no supervised term): the student
    trains on the mixed patches only, a cheaper step (the labeled patches do not go through the student a second
    time)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.bcp_labeled_loss_weight = 0.0

