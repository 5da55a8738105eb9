"""BCP with nnU-Net's loss on the un-mixed labeled patches beside the BCP loss in stage 2 (``bcp_labeled_loss_weight =
1``): the best-measured option of the label-scarce benchmark so far (README, "Does it help?"), not yet the default.
It sends the labeled patches through the student's forward and backward pass a second time, un-mixed: about 2.7× the
time of a plain nnU-Net step on a CPU (docs/benchmarks.md)."""
import torch

from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP


class nnUNetTrainerBCP_labeledLoss(nnUNetTrainerBCP):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.bcp_labeled_loss_weight = 1.0
