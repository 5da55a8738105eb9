"""The paper's stage 1 as a trainer: copy-paste between the labeled patches for a fifth of the schedule, one poly
decay over the whole run (the plugin's default is nnU-Net's own training for half of it, and a restart)."""
import torch

from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP


class nnUNetTrainerBCP_paperStageOne(nnUNetTrainerBCP):
    """Stage 1 as the BCP paper pre-trains: the labeled patches mixed with each other by the same box masks as stage
    2. The reference code pre-trains 10k of 40k iterations on ACDC (25 %) and 2k of 17k on LA (12 %); a fifth lies
    between the two."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.bcp_stage_one = "copy_paste"
        self.bcp_pretrain_fraction = 0.2
        self.bcp_restart_lr = False
