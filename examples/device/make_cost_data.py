"""A small copy of a preprocessed dataset for the device check (examples/device_check.sh): nnU-Net's plans (its own
batch size and patch size, planned on the whole dataset; one or more plans, e.g. nnUNetPlans and a ResEnc plans), a few
preprocessed cases, one fold, and a label subset.

    python examples/device/make_cost_data.py -i BENCH/nnUNet_preprocessed/Dataset604_Hippocampus -o .device/data \
        [-p nnUNetPlans nnUNetResEncUNetMPlans]
    # -> .device/data/nnUNet_preprocessed/Dataset604_Hippocampus (fold 0: --train cases, half of them labeled)

The cost benchmark only needs batches and the plans, so a few cases carry what the whole dataset would.
"""
import argparse
import os
import shutil

from batchgenerators.utilities.file_and_folder_operations import join, load_json, maybe_mkdir_p, save_json

from nnunetv2_bcp.unlabeled.label_subset import LABEL_SUBSET_FILE, choose_label_subset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", required=True, help="nnU-Net's preprocessed dataset folder (planned, preprocessed)")
    parser.add_argument("-o", required=True, help="output root: gets nnUNet_preprocessed/<dataset>")
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", nargs="+", default=["nnUNetPlans"], help="plans to copy with their data (each planned "
                        "and preprocessed for -c in -i)")
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--val", type=int, default=6)
    args = parser.parse_args()
    split = load_json(join(args.i, "splits_final.json"))[0]
    train, val = sorted(split["train"])[:args.train], sorted(split["val"])[:args.val]
    out = join(os.path.abspath(args.o), "nnUNet_preprocessed", os.path.basename(os.path.normpath(args.i)))
    shutil.rmtree(out, ignore_errors=True)
    maybe_mkdir_p(join(out, "gt_segmentations"))
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copy(join(args.i, name), join(out, name))
    for plans_name in args.p:
        shutil.copy(join(args.i, plans_name + ".json"), join(out, plans_name + ".json"))
        data_folder = load_json(join(args.i, plans_name + ".json"))["configurations"][args.c]["data_identifier"]
        if os.path.isdir(join(out, data_folder)):  # plans that share their preprocessed data
            continue
        maybe_mkdir_p(join(out, data_folder))
        files = os.listdir(join(args.i, data_folder))
        for case in train + val:
            for f in files:
                if f.startswith(case + ".") or f.startswith(case + "_seg."):
                    shutil.copy(join(args.i, data_folder, f), join(out, data_folder, f))
    ending = load_json(join(args.i, "dataset.json"))["file_ending"]
    for case in val:
        shutil.copy(join(args.i, "gt_segmentations", case + ending), join(out, "gt_segmentations", case + ending))
    split = [{"train": train, "val": val}]
    save_json(split, join(out, "splits_final.json"))
    subset = choose_label_subset(train + val, split, num_labeled=args.train // 2)
    save_json(subset, join(out, LABEL_SUBSET_FILE), sort_keys=False)
    print(f"{out}: {len(train)} training cases ({args.train // 2} labeled), {len(val)} validation cases")


if __name__ == "__main__":
    main()
