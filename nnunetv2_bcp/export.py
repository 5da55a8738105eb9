"""Export a BCP model folder for plain nnU-Net (no plugin needed to predict), with the student or the teacher."""
import argparse
import shutil

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, maybe_mkdir_p, subdirs


def export_for_plain_nnunet(model_folder: str, output_folder: str, folds=None,
                            checkpoint_name: str = "checkpoint_final.pth", use_teacher: bool = False) -> None:
    """Copy ``model_folder`` (``Trainer__Plans__Config``) to ``output_folder`` with checkpoints that name
    ``nnUNetTrainer`` (BCP does not change the network) and hold the student's weights, or the teacher's with
    ``use_teacher``. The result works with ``nnUNetv2_predict_from_modelfolder -m output_folder``."""
    folds = folds or [d[len("fold_"):] for d in subdirs(model_folder, prefix="fold_", join=False)]
    maybe_mkdir_p(output_folder)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if isfile(join(model_folder, name)):
            shutil.copy(join(model_folder, name), join(output_folder, name))
    for fold in folds:
        source = join(model_folder, f"fold_{fold}", checkpoint_name)
        if not isfile(source):
            raise SystemExit(f"ERROR: {source} does not exist")
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
        bcp = checkpoint.pop("bcp", None)
        if use_teacher:
            if bcp is None:
                raise SystemExit(f"ERROR: {source} holds no BCP teacher")
            checkpoint["network_weights"] = bcp["teacher_weights"]
        checkpoint["trainer_name"] = "nnUNetTrainer"
        checkpoint["init_args"] = dict(checkpoint["init_args"])
        maybe_mkdir_p(join(output_folder, f"fold_{fold}"))
        torch.save(checkpoint, join(output_folder, f"fold_{fold}", checkpoint_name))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a trained BCP model for plain nnU-Net (student weights, "
                                                 "or the EMA teacher with --teacher).")
    parser.add_argument("-i", required=True, help="model folder nnUNet_results/DatasetXXX/Trainer__Plans__Config")
    parser.add_argument("-o", required=True, help="output model folder")
    parser.add_argument("-f", nargs="+", default=None, help="folds (default: all fold_X folders)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("--teacher", action="store_true", help="export the EMA teacher instead of the student")
    args = parser.parse_args(argv)
    export_for_plain_nnunet(args.i, args.o, args.f, args.chk, args.teacher)
    print(f"exported to {args.o}; predict with: nnUNetv2_predict_from_modelfolder -i INPUT -o OUTPUT -m {args.o}")


if __name__ == "__main__":
    main()
