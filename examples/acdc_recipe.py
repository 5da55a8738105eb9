"""Paper protocol on ACDC (BCP's Table: 3 or 7 labeled patients of 70), for users with GPUs.

1. Convert the public ACDC training set (``ACDC/database/training/patientXXX/patientXXX_frameYY[_gt].nii.gz``,
   100 patients, ED and ES frames) into an nnU-Net dataset with a seeded patient-level 70/10/20 split
   (train / validation / test, as the semi-supervised papers use; their exact patient lists are not public here):
       python examples/acdc_recipe.py convert -i /data/ACDC/database/training -d 27
   Writes ``nnUNet_raw/Dataset027_ACDC`` (train+validation patients in imagesTr/labelsTr, test patients in
   imagesTs/labelsTs) and ``acdc_split.json`` next to it.
2. Then (printed by ``convert``):
       nnUNetv2_plan_and_preprocess -d 27 -c 2d
       python examples/acdc_recipe.py split -d 27 --labeled-patients 3      # splits_final.json + label subset
       nnUNetv2_train 27 2d 0 -tr nnUNetTrainerBCP_labelSubset              # BCP: 3 patients labeled, 67 unlabeled
       # (the plugin's defaults add a supervised term the paper does not have; a subclass of
       # nnUNetTrainerBCP_labelSubset with bcp_labeled_loss_weight = 0 trains the paper's loss alone)
       nnUNetv2_train 27 2d 0 -tr nnUNetTrainerLabelSubset                  # labeled-only nnU-Net, same 3 patients
       nnUNetv2_predict -i $nnUNet_raw/Dataset027_ACDC/imagesTs -o pred_bcp -d 27 -c 2d -f 0 \
           -tr nnUNetTrainerBCP_labelSubset
       nnUNetv2_evaluate_simple $nnUNet_raw/Dataset027_ACDC/labelsTs pred_bcp -l 1 2 3
"""
import argparse
import os
import re
import shutil
from typing import Dict, List

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, load_json, maybe_mkdir_p, save_json

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
FRAME = re.compile(r"^(patient\d{3})_frame(\d{2})\.nii\.gz$")


def find_acdc_frames(acdc_training: str) -> Dict[str, List[str]]:
    """patient -> case identifiers (``patientXXX_frameYY``) of its labeled frames (ED and ES)."""
    patients = {}
    for patient in sorted(os.listdir(acdc_training)):
        folder = join(acdc_training, patient)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            match = FRAME.match(name)
            if match and os.path.isfile(join(folder, name.replace(".nii.gz", "_gt.nii.gz"))):
                patients.setdefault(match[1], []).append(name[:-len(".nii.gz")])
    if not patients:
        raise SystemExit(f"no ACDC frames (patientXXX/patientXXX_frameYY.nii.gz with _gt) found in {acdc_training}")
    return patients


def patient_split(patients: List[str], seed: int = 0, fractions=(0.7, 0.1, 0.2)) -> Dict[str, List[str]]:
    """Seeded patient-level split into train / val / test (70/10/20 of ACDC's 100 training patients)."""
    order = np.random.default_rng(seed).permutation(sorted(patients)).tolist()
    n_train, n_val = round(fractions[0] * len(order)), round(fractions[1] * len(order))
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def convert(acdc_training: str, raw_root: str, dataset_id: int, seed: int = 0) -> str:
    frames = find_acdc_frames(acdc_training)
    split = patient_split(list(frames), seed)
    folder = join(raw_root, f"Dataset{dataset_id:03d}_ACDC")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        maybe_mkdir_p(join(folder, sub))
    for group, (images, labels) in (("train", ("imagesTr", "labelsTr")), ("val", ("imagesTr", "labelsTr")),
                                    ("test", ("imagesTs", "labelsTs"))):
        for patient in split[group]:
            for case in frames[patient]:
                source = join(acdc_training, patient, case)
                shutil.copy(source + ".nii.gz", join(folder, images, case + "_0000.nii.gz"))
                shutil.copy(source + "_gt.nii.gz", join(folder, labels, case + ".nii.gz"))
    save_json({"channel_names": {"0": "cineMRI"}, "labels": LABELS, "file_ending": ".nii.gz",
               "numTraining": sum(len(frames[p]) for p in split["train"] + split["val"]), "name": "ACDC",
               "description": "ACDC ED/ES frames; patient-level 70/10/20 split by nnunetv2_bcp's acdc_recipe"},
              join(folder, "dataset.json"), sort_keys=False)
    save_json({"seed": seed, **split, "frames": {p: frames[p] for p in sorted(frames)}},
              join(folder, "acdc_split.json"), sort_keys=False)
    return folder


def write_split_and_subset(raw_folder: str, preprocessed_folder: str, labeled_patients: int, seed: int = 0) -> dict:
    """nnU-Net's ``splits_final.json`` (fold 0: the 70 training patients' frames vs the 10 validation patients')
    and the label subset: all frames of ``labeled_patients`` seeded training patients keep their labels."""
    from nnunetv2_bcp.unlabeled.label_subset import LABEL_SUBSET_FILE, choose_label_subset
    split = load_json(join(raw_folder, "acdc_split.json"))
    frames = split["frames"]
    train = [c for p in split["train"] for c in frames[p]]
    val = [c for p in split["val"] for c in frames[p]]
    splits = [{"train": train, "val": val}]
    save_json(splits, join(preprocessed_folder, "splits_final.json"))
    chosen = np.random.default_rng(seed).choice(split["train"], labeled_patients, replace=False).tolist()
    subset = choose_label_subset(train + val, splits, labeled_cases=[c for p in sorted(chosen) for c in frames[p]])
    subset["folds"].pop("all")  # fold 'all' would train on the validation patients too
    subset["labeled_patients"] = sorted(chosen)
    save_json(subset, join(preprocessed_folder, LABEL_SUBSET_FILE), sort_keys=False)
    return subset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("-i", required=True, help="ACDC/database/training")
    s = sub.add_parser("split")
    s.add_argument("--labeled-patients", type=int, required=True, help="3 (5%%) or 7 (10%%) in the papers")
    for p in (c, s):
        p.add_argument("-d", type=int, default=27, help="dataset id (default 27)")
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    if args.command == "convert":
        folder = convert(args.i, str(nnUNet_raw), args.d, args.seed)
        print(f"written {folder}\nnext: nnUNetv2_plan_and_preprocess -d {args.d} -c 2d && "
              f"python {__file__} split -d {args.d} --labeled-patients 3")
    else:
        name = f"Dataset{args.d:03d}_ACDC"
        subset = write_split_and_subset(join(nnUNet_raw, name), join(nnUNet_preprocessed, name),
                                        args.labeled_patients, args.seed)
        print(f"labeled patients {subset['labeled_patients']}: {len(subset['folds']['0']['labeled'])} labeled, "
              f"{len(subset['folds']['0']['unlabeled'])} unlabeled frames in fold 0")


if __name__ == "__main__":
    main()
