# Shim for nnU-Net's nnUNet_extTrainer search: the trainers live in the installed package (so that worker
# processes can pickle them); this module only re-exports them.
from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP  # noqa: F401
from nnunetv2_bcp.training.nnUNetTrainerLabelSubset import nnUNetTrainerLabelSubset  # noqa: F401
from nnunetv2_bcp.training.variants import *  # noqa: F401,F403
from nnunetv2_bcp.training.variant_labeled_loss import nnUNetTrainerBCP_referenceLoss  # noqa: F401
from nnunetv2_bcp.training.variant_stage_one import nnUNetTrainerBCP_paperStageOne  # noqa: F401
from nnunetv2_bcp.training.variant_label_subset import nnUNetTrainerBCP_labelSubset  # noqa: F401
from nnunetv2_bcp.demo.trainers import nnUNetTrainerBCPDemo, nnUNetTrainerDemo  # noqa: F401
