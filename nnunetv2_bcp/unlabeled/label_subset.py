"""Simulated label scarcity: only K training cases of each fold keep their labels, the rest become unlabeled.

Stored as ``nnUNet_preprocessed/DatasetXXX/bcp_label_subset.json`` next to nnU-Net's ``splits_final.json``::

    {"num_labeled": 4, "seed": 0, "folds": {"0": {"labeled": [...], "unlabeled": [...]}, ..., "all": {...}}}

nnU-Net's validation split is not touched: the subset only decides which of a fold's *training* cases keep
their label. The label-dropped cases join the unlabeled stream through nnU-Net's preprocessed images only, read
in place (their label files and ``class_locations`` are never opened).
"""
import argparse
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, save_json
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunetv2_bcp.unlabeled.raw import UnlabeledDataError

LABEL_SUBSET_FILE = "bcp_label_subset.json"


def label_subset_path(preprocessed_dataset_folder: str) -> str:
    return join(preprocessed_dataset_folder, LABEL_SUBSET_FILE)


def nnunet_splits(preprocessed_dataset_folder: str, training_identifiers: Sequence[str]) -> List[dict]:
    """nnU-Net's ``splits_final.json``, created exactly as ``nnUNetTrainer.do_split`` would if it is missing."""
    splits_file = join(preprocessed_dataset_folder, "splits_final.json")
    if not isfile(splits_file):
        save_json(generate_crossval_split(sorted(training_identifiers), seed=12345, n_splits=5), splits_file)
    return load_json(splits_file)


def choose_label_subset(training_identifiers: Sequence[str], splits: List[dict], num_labeled: Optional[int] = None,
                        labeled_cases: Optional[Sequence[str]] = None, seed: int = 0) -> dict:
    """Per fold (and for fold ``all``): which training cases keep their labels.

    Either ``num_labeled`` cases drawn per fold from that fold's training cases (seeded by ``seed`` and the fold),
    or the explicit ``labeled_cases`` for every fold (each fold keeps those that are among its training cases).
    """
    if (num_labeled is None) == (labeled_cases is None):
        raise UnlabeledDataError("give either the number of labeled cases (-k) or the labeled cases (--cases)")
    all_ids = sorted(training_identifiers)
    if labeled_cases is not None:
        unknown = sorted(set(labeled_cases) - set(all_ids))
        if unknown:
            raise UnlabeledDataError(f"label subset names cases that are not training cases of this dataset: "
                                     f"{unknown[:10]} (known cases look like {all_ids[:3]})")
    folds = {str(i): s["train"] for i, s in enumerate(splits)}
    folds["all"] = all_ids
    subset = {"num_labeled": num_labeled, "seed": seed, "folds": {}}
    for fold, train in folds.items():
        train = sorted(train)
        if labeled_cases is not None:
            labeled = sorted(set(labeled_cases) & set(train))
        else:
            if not 1 <= num_labeled <= len(train):
                raise UnlabeledDataError(f"asked for {num_labeled} labeled cases but fold {fold} has "
                                         f"{len(train)} training cases")
            rng = np.random.default_rng([seed, 0 if fold == "all" else int(fold) + 1])
            labeled = sorted(rng.choice(train, num_labeled, replace=False).tolist())
        subset["folds"][fold] = {"labeled": labeled, "unlabeled": [c for c in train if c not in labeled]}
    return subset


def load_label_subset(preprocessed_dataset_folder: str, training_identifiers: Sequence[str]) -> Optional[dict]:
    """The stored subset (None if there is none), checked against the dataset's training cases."""
    path = label_subset_path(preprocessed_dataset_folder)
    if not isfile(path):
        return None
    try:
        subset = load_json(path)
        folds = subset["folds"]
        if not isinstance(folds, dict):
            raise TypeError(f"'folds' is a {type(folds).__name__}, not a mapping of fold to cases")
        for fold, entry in folds.items():
            if not (isinstance(entry, dict) and all(isinstance(entry.get(k), list) for k in ("labeled", "unlabeled"))):
                raise ValueError(f"fold {fold} needs lists 'labeled' and 'unlabeled'")
    except (ValueError, KeyError, TypeError) as e:
        raise UnlabeledDataError(f"{path}: not a label subset file ({e}); recreate it with "
                                 f"nnUNetv2_bcp_label_subset") from e
    known = set(training_identifiers)
    for fold, entry in folds.items():
        named = set(entry["labeled"]) | set(entry["unlabeled"])
        unknown = sorted(named - known)
        if unknown:
            raise UnlabeledDataError(f"{path}: fold {fold} names cases that are not training cases of this "
                                     f"dataset: {unknown[:10]}")
        if set(entry["labeled"]) & set(entry["unlabeled"]):
            raise UnlabeledDataError(f"{path}: fold {fold} lists cases as both labeled and unlabeled")
    return subset


def fold_subset(subset: Optional[dict], fold, path: str) -> Optional[Dict[str, List[str]]]:
    """The ``{"labeled": [...], "unlabeled": [...]}`` entry of one fold (None without a subset)."""
    if subset is None:
        return None
    if str(fold) not in subset["folds"]:
        raise UnlabeledDataError(f"{path} has no entry for fold {fold} (it has {sorted(subset['folds'])}); "
                                 f"recreate it with nnUNetv2_bcp_label_subset")
    return subset["folds"][str(fold)]


def main(argv=None):
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    parser = argparse.ArgumentParser(description="Simulate label scarcity for BCP: keep the labels of only K "
                                                 "training cases per fold; the others join the unlabeled stream. "
                                                 f"Writes nnUNet_preprocessed/DatasetXXX/{LABEL_SUBSET_FILE}.")
    parser.add_argument("-d", required=True, help="dataset name or id")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-k", type=int, help="number of labeled cases per fold (seeded random choice)")
    group.add_argument("--cases", nargs="+", help="explicit labeled case identifiers (same for every fold)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice (default 0)")
    parser.add_argument("--remove", action="store_true", help="delete the subset file: all labels are used again")
    args = parser.parse_args(argv)

    dataset_name = maybe_convert_to_dataset_name(args.d)
    preprocessed = join(nnUNet_preprocessed, dataset_name)
    if not os.path.isdir(preprocessed):
        raise SystemExit(f"{preprocessed} does not exist: run nnUNetv2_plan_and_preprocess -d {args.d} first")
    path = label_subset_path(preprocessed)
    if args.remove:
        if isfile(path):
            os.remove(path)
        print(f"removed {path}")
        return
    if args.k is None and args.cases is None:
        parser.error("give -k K or --cases ... (or --remove)")
    raw = join(nnUNet_raw, dataset_name)
    identifiers = list(get_filenames_of_train_images_and_targets(raw, load_json(join(raw, "dataset.json"))).keys())
    try:
        subset = choose_label_subset(identifiers, nnunet_splits(preprocessed, identifiers), args.k, args.cases,
                                     args.seed)
    except UnlabeledDataError as e:
        raise SystemExit(f"ERROR: {e}")
    save_json(subset, path, sort_keys=False)
    for fold, entry in subset["folds"].items():
        print(f"fold {fold}: {len(entry['labeled'])} labeled, {len(entry['unlabeled'])} unlabeled training cases")
    print(f"written {path}")


if __name__ == "__main__":
    main()
