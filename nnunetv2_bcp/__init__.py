"""nnunetv2_bcp: Bidirectional Copy-Paste semi-supervised training for nnU-Net v2."""
import os

__version__ = "0.1.0"


def ext_trainer_dir() -> str:
    """The folder to list in nnU-Net's ``nnUNet_extTrainer`` variable so that nnUNetv2_train/predict find BCP;
    the console command ``nnUNetv2_bcp_ext_trainer_dir`` prints it (see nnunetv2_bcp.ext_trainer_cli)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainer")


def __getattr__(name):  # import the trainer lazily: it pulls in all of nnU-Net's training code
    if name == "nnUNetTrainerBCP":
        from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP
        return nnUNetTrainerBCP
    raise AttributeError(f"module 'nnunetv2_bcp' has no attribute '{name}'")
