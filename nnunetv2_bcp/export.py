"""Export a BCP model folder for plain nnU-Net (no plugin needed to predict), with the student or the teacher.

The output is a model folder like any of nnU-Net's: put it at ``RESULTS/DatasetXXX_Name/Trainer__Plans__Config`` of
some results root and nnUNetv2_predict, nnUNetv2_export_model_to_zip and nnUNetv2_install_pretrained_model_from_zip
treat it as theirs (plain nnU-Net picks the trainer class from the checkpoint, not from the folder name)."""
import argparse
import os
import shutil

import torch
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, maybe_mkdir_p, subdirs

# What nnU-Net's predictor and its -pretrained_weights read; the optimiser, grad scaler, training log and the BCP
# state (the EMA teacher) stay behind: they would double the file for nothing the user of the model needs.
INFERENCE_KEYS = ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes", "current_epoch")
# Besides the checkpoints, what nnUNetv2_export_model_to_zip packs (it requires progress.png and the summary)
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
FOLD_FILES = ("debug.json", "progress.png", "network_architecture.pdf", join("validation", "summary.json"))
CROSSVAL_FILES = ("summary.json", "postprocessing.pkl", "postprocessing.json")


def plain_checkpoint(checkpoint: dict, use_teacher: bool = False) -> dict:
    """The inference part of a BCP checkpoint, naming ``nnUNetTrainer`` (BCP does not change the network), with
    the student's weights or the EMA teacher's."""
    exported = {k: checkpoint[k] for k in INFERENCE_KEYS if k in checkpoint}
    if use_teacher:
        if "bcp" not in checkpoint:
            raise ValueError("the checkpoint holds no BCP teacher")
        if not checkpoint["bcp"].get("teacher_initialized", True):
            # before stage 2 the teacher is the network's random initialisation
            raise ValueError(f"its teacher was never trained (stage 1, epoch {checkpoint.get('current_epoch')}): "
                             f"export the student (without --teacher) or a checkpoint from stage 2")
        exported["network_weights"] = checkpoint["bcp"]["teacher_weights"]
    exported["trainer_name"] = "nnUNetTrainer"
    return exported


def _copy_if_present(source_folder: str, target_folder: str, names) -> None:
    for name in names:
        if isfile(join(source_folder, name)):
            maybe_mkdir_p(os.path.dirname(join(target_folder, name)))
            shutil.copy(join(source_folder, name), join(target_folder, name))


def export_for_plain_nnunet(model_folder: str, output_folder: str, folds=None,
                            checkpoint_names=("checkpoint_final.pth",), use_teacher: bool = False) -> None:
    """Copy ``model_folder`` (``Trainer__Plans__Config``) to ``output_folder`` with checkpoints for plain nnU-Net
    (see plain_checkpoint), the files nnUNetv2_export_model_to_zip packs, and the cross-validation results with the
    postprocessing that nnUNetv2_find_best_configuration chose."""
    if isinstance(checkpoint_names, str):
        checkpoint_names = (checkpoint_names,)
    if os.path.realpath(output_folder) == os.path.realpath(model_folder):
        raise SystemExit("ERROR: the output folder must differ from the model folder (its checkpoints would be "
                         "replaced by stripped copies)")
    if not isdir(model_folder):
        raise SystemExit(f"ERROR: {model_folder} is not a folder: give a model folder "
                         f"(nnUNet_results/DatasetXXX_Name/Trainer__Plans__Configuration)")
    folds = folds or [d[len("fold_"):] for d in subdirs(model_folder, prefix="fold_", join=False)]
    if not folds:
        raise SystemExit(f"ERROR: {model_folder} holds no fold_X folder")
    maybe_mkdir_p(output_folder)
    _copy_if_present(model_folder, output_folder, MODEL_FILES)
    for crossval in subdirs(model_folder, prefix="crossval_results_folds_", join=False):
        _copy_if_present(join(model_folder, crossval), join(output_folder, crossval), CROSSVAL_FILES)
    for fold in folds:
        source, target = join(model_folder, f"fold_{fold}"), join(output_folder, f"fold_{fold}")
        if not isdir(source):
            raise SystemExit(f"ERROR: {source} does not exist")
        maybe_mkdir_p(target)
        _copy_if_present(source, target, FOLD_FILES)
        for name in checkpoint_names:
            if not isfile(join(source, name)):
                raise SystemExit(f"ERROR: {join(source, name)} does not exist")
            checkpoint = torch.load(join(source, name), map_location="cpu", weights_only=False)
            try:
                torch.save(plain_checkpoint(checkpoint, use_teacher), join(target, name))
            except ValueError as e:
                raise SystemExit(f"ERROR: {join(source, name)}: {e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", required=True, help="model folder nnUNet_results/DatasetXXX/Trainer__Plans__Config")
    parser.add_argument("-o", required=True, help="output model folder, e.g. EXPORT/DatasetXXX_Name/"
                                                 "nnUNetTrainerBCP__nnUNetPlans__3d_fullres (a results root other "
                                                 "than nnUNet_results, so that nothing of the training is replaced)")
    parser.add_argument("-f", nargs="+", default=None, help="folds (default: all fold_X folders)")
    parser.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"],
                        help="checkpoint names (default checkpoint_final.pth)")
    parser.add_argument("--teacher", action="store_true", help="export the EMA teacher instead of the student")
    args = parser.parse_args(argv)
    export_for_plain_nnunet(args.i, args.o, args.f, args.chk, args.teacher)
    print(f"exported to {args.o}; predict with: nnUNetv2_predict_from_modelfolder -i INPUT -o OUTPUT -m {args.o}")


if __name__ == "__main__":
    main()
