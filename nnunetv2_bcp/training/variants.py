"""Epoch-count variants, named like nnU-Net's ``nnUNetTrainer_Xepochs``; stage 1 keeps its share of the schedule."""
import torch

from nnunetv2_bcp.training.nnUNetTrainerBCP import default_pretrain_epochs, nnUNetTrainerBCP

EPOCH_COUNTS = (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000)


def _epochs_variant(num_epochs: int) -> type:
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super(variant, self).__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = num_epochs
        self.bcp_pretrain_epochs = default_pretrain_epochs(num_epochs)

    name = f"nnUNetTrainerBCP_{num_epochs}epoch{'s' if num_epochs > 1 else ''}"
    variant = type(name, (nnUNetTrainerBCP,), {"__init__": __init__, "__module__": __name__,
                                               "__doc__": f"BCP with {num_epochs} epochs."})
    return variant


for _n in EPOCH_COUNTS:
    _cls = _epochs_variant(_n)
    globals()[_cls.__name__] = _cls
__all__ = [f"nnUNetTrainerBCP_{n}epoch{'s' if n > 1 else ''}" for n in EPOCH_COUNTS]
