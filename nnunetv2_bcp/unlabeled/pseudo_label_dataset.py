"""``nnUNetv2_bcp_pseudo_label_dataset``: offline pseudo-labels, the recipe nnU-Net's maintainers recommend for
unlabeled scans (train, predict the unlabeled scans, train again on labels + pseudo-labels), as one command.

A trained model of dataset SOURCE predicts its unlabeled images (``imagesUnlabeled``, and the label-dropped training
cases of a label subset where the model's trainer trained on that subset) with nnU-Net's own predictor. The command
writes dataset TARGET: the fold's labeled training cases and validation cases with their labels, the unlabeled cases
with their pseudo-labels, SOURCE's plans (so that the model can continue on it) and a ``splits_final.json`` whose fold
FOLD trains on labeled + pseudo-labeled cases and validates on SOURCE's validation cases of that fold. It then
preprocesses TARGET. Train fold FOLD of TARGET, from scratch or continued from the model::

    nnUNetv2_bcp_pseudo_label_dataset -d SOURCE -t TARGET -c 3d_fullres -f 0 -tr nnUNetTrainer
    nnUNetv2_bcp_start_from_model TARGET 3d_fullres 0 -tr nnUNetTrainer -m .../fold_0/checkpoint_final.pth
    nnUNetv2_train TARGET 3d_fullres 0 --c

Images and labels are linked, not copied. The pseudo-labels are the model's plain predictions (no threshold, no
component filter); ``bcp_pseudo_labels.json`` in TARGET's raw folder records which model made them.
"""
import argparse
import copy
import os
import shutil
from typing import Dict, List, Optional

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p, save_json

from nnunetv2_bcp.unlabeled.label_subset import fold_subset, label_subset_path, load_label_subset
from nnunetv2_bcp.unlabeled.raw import UNLABELED_FOLDER, find_unlabeled_cases

RECORD_FILE = "bcp_pseudo_labels.json"


def fold_cases(splits: List[dict], fold: int, subset: Optional[dict], subset_path: str) -> Dict[str, List[str]]:
    """``labeled``, ``unlabeled`` (label-dropped by a label subset) and ``val`` training-case identifiers of a fold."""
    if not 0 <= fold < len(splits):
        raise SystemExit(f"ERROR: fold {fold} is not in splits_final.json (it has folds 0..{len(splits) - 1})")
    entry = fold_subset(subset, fold, subset_path)
    labeled = entry["labeled"] if entry else sorted(splits[fold]["train"])
    return {"labeled": labeled, "unlabeled": entry["unlabeled"] if entry else [], "val": sorted(splits[fold]["val"])}


def trained_on_label_subset(checkpoint: str) -> bool:
    """Whether the checkpoint's trainer (its ``trainer_name``) opts in to a label subset (``uses_label_subset``)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2_bcp.training.checkpoint import UnreadableCheckpointError, load_checkpoint
    try:  # read as nnU-Net's predictor reads it next; the weights stay on disk
        name = load_checkpoint(checkpoint, mmap=True).get("trainer_name")
    except UnreadableCheckpointError as e:
        raise SystemExit(f"ERROR: {e}")
    if not name:
        return False
    try:
        trainer = recursive_find_trainer_class_by_name(name)
    except RuntimeError:  # not on this machine: the predictor names it
        return False
    return bool(getattr(trainer, "uses_label_subset", False))


def _link(source: str, target: str) -> None:
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(os.path.abspath(source), target)


def refuse_to_replace(source_raw: str, target_raw: str) -> None:
    """TARGET's raw folder is removed and written again: refuse where it is SOURCE's or where this command did not
    write it (it holds no record), so that no user's dataset is deleted."""
    if os.path.realpath(target_raw) == os.path.realpath(source_raw):
        raise SystemExit(f"ERROR: the target {target_raw} is the source dataset: choose another -t or -tname")
    if os.path.lexists(target_raw) and not isfile(join(target_raw, RECORD_FILE)):
        raise SystemExit(f"ERROR: {target_raw} exists and was not written by this command (it has no {RECORD_FILE}): "
                         f"remove it yourself or choose another -t")


def write_pseudo_label_dataset(source_raw: str, source_preprocessed: str, target_raw: str, model_folder: str,
                               fold: int, checkpoint_name: str = "checkpoint_final.pth", device: str = "cuda",
                               num_processes: int = 2, use_mirroring: bool = True) -> dict:
    """Write TARGET's raw folder (links, pseudo-labels, dataset.json, the record); return the record. A label
    subset's dropped cases count as unlabeled where the model's trainer trained on the subset (it opted in)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    refuse_to_replace(source_raw, target_raw)
    dataset_json = load_json(join(source_raw, "dataset.json"))
    training = get_filenames_of_train_images_and_targets(source_raw, copy.deepcopy(dataset_json))
    splits_file = join(source_preprocessed, "splits_final.json")
    if not isfile(splits_file):
        raise SystemExit(f"ERROR: {splits_file} is missing: train the source model first (nnU-Net writes it)")
    subset_path = label_subset_path(source_preprocessed)
    checkpoint = join(model_folder, f"fold_{fold}", checkpoint_name)
    if not isfile(checkpoint):
        raise SystemExit(f"ERROR: {checkpoint}: no such checkpoint (the model that makes the pseudo-labels)")
    subset = load_label_subset(source_preprocessed, list(training)) if trained_on_label_subset(checkpoint) else None
    cases = fold_cases(load_json(splits_file), fold, subset, subset_path)
    unlabeled = {c: training[c]["images"] for c in cases["unlabeled"]}
    extra = find_unlabeled_cases(source_raw, dataset_json)
    clash = sorted(set(extra) & (set(training) | set(unlabeled)))
    if clash:
        raise SystemExit(f"ERROR: {join(source_raw, UNLABELED_FOLDER)} repeats training case names {clash[:5]}")
    unlabeled.update(extra)
    if not unlabeled:
        raise SystemExit(f"ERROR: {source_raw} has no unlabeled images for fold {fold}: put them in "
                         f"{UNLABELED_FOLDER}/ (named like imagesTr) or use a label subset")

    ending = dataset_json["file_ending"]
    images, labels = join(target_raw, "imagesTr"), join(target_raw, "labelsTr")
    shutil.rmtree(target_raw, ignore_errors=True)
    maybe_mkdir_p(images)
    maybe_mkdir_p(labels)
    # the folder is this command's from now on: a run that fails or is stopped before the end may be run again
    save_json({"source": os.path.basename(os.path.normpath(source_raw)), "complete": False},
              join(target_raw, RECORD_FILE), sort_keys=False)
    for case in cases["labeled"] + cases["val"]:
        for channel, path in enumerate(training[case]["images"]):
            _link(path, join(images, f"{case}_{channel:04d}{ending}"))
        _link(training[case]["label"], join(labels, f"{case}{ending}"))
    for case, files in unlabeled.items():
        for channel, path in enumerate(files):
            _link(path, join(images, f"{case}_{channel:04d}{ending}"))

    predictor = nnUNetPredictor(use_mirroring=use_mirroring, device=torch.device(device), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, (fold,), checkpoint_name)
    names = sorted(unlabeled)
    predictor.predict_from_files([unlabeled[c] for c in names], [join(labels, c) for c in names],
                                 save_probabilities=False, overwrite=True, num_processes_preprocessing=num_processes,
                                 num_processes_segmentation_export=num_processes)
    missing = [c for c in names if not isfile(join(labels, f"{c}{ending}"))]
    if missing:
        raise SystemExit(f"ERROR: the predictor wrote no pseudo-label for {missing[:5]} (see its output above)")

    # the target lists its own files in imagesTr / labelsTr: a source's ``dataset`` entry would make nnU-Net
    # preprocess the source's cases instead
    target_json = {**{k: v for k, v in dataset_json.items() if k != "dataset"},
                   "numTraining": len(cases["labeled"]) + len(cases["val"]) + len(names),
                   "description": f"{dataset_json.get('name', '')}: labels + pseudo-labels of {checkpoint}"}
    save_json(target_json, join(target_raw, "dataset.json"), sort_keys=False)
    # the axes nnU-Net's predictor mirrored along: only those the model allows, none for a model trained without
    mirrored = [int(axis) for axis in predictor.allowed_mirroring_axes or ()] if use_mirroring else []
    record = {"source": os.path.basename(os.path.normpath(source_raw)), "complete": True,
              "model": os.path.abspath(checkpoint), "fold": fold, "mirror_axes": mirrored or None,
              "labeled": cases["labeled"], "val": cases["val"], "pseudo_labeled": names}
    save_json(record, join(target_raw, RECORD_FILE), sort_keys=False)
    return record


def target_splits(record: dict) -> List[dict]:
    """``splits_final.json`` of TARGET: only fold ``record['fold']`` is meant to be trained; lower fold numbers
    repeat it so that nnU-Net finds the fold at its index."""
    entry = {"train": sorted(record["labeled"] + record["pseudo_labeled"]), "val": record["val"]}
    return [entry] * (record["fold"] + 1)


def main(argv=None):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="source dataset name or id (its model, labels, unlabeled images)")
    parser.add_argument("-t", type=int, required=True, help="id of the dataset to write (labels + pseudo-labels)")
    parser.add_argument("-tname", default=None, help="name of that dataset [<source name>Pseudo]")
    parser.add_argument("-c", required=True, help="configuration of the model, e.g. 3d_fullres")
    parser.add_argument("-f", type=int, default=0, help="fold of the model and of the split [0]")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer of the model [nnUNetTrainer]")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier of the model [nnUNetPlans]")
    parser.add_argument("-m", default=None, help="model folder (holding fold_F/); default from -d, -tr, -p, -c in "
                                                 "nnUNet_results")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint [checkpoint_final.pth]")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"))
    parser.add_argument("-np", type=int, default=2, help="processes for preprocessing and export [2]")
    parser.add_argument("--disable_tta", action="store_true", help="predict without mirroring (4-8x faster)")
    args = parser.parse_args(argv)

    source = maybe_convert_to_dataset_name(args.d)
    target = f"Dataset{args.t:03d}_{args.tname or source.split('_', 1)[1] + 'Pseudo'}"
    existing = [d for d in os.listdir(nnUNet_raw) if d.startswith(f"Dataset{args.t:03d}_") and d != target]
    if existing:
        raise SystemExit(f"ERROR: dataset id {args.t} is taken by {existing[0]} in {nnUNet_raw}: choose another -t")
    model = args.m or join(nnUNet_results, source, f"{args.tr}__{args.p}__{args.c}")
    record = write_pseudo_label_dataset(join(nnUNet_raw, source), join(nnUNet_preprocessed, source),
                                        join(nnUNet_raw, target), model, args.f, args.chk, args.device, args.np,
                                        not args.disable_tta)
    maybe_mkdir_p(join(nnUNet_preprocessed, target))
    move_plans_between_datasets(source, target, args.p, args.p)
    # what nnU-Net's planning writes there and its trainer reads; the fingerprint is the source's, as are the plans
    shutil.copy(join(nnUNet_raw, target, "dataset.json"), join(nnUNet_preprocessed, target, "dataset.json"))
    shutil.copy(join(nnUNet_preprocessed, source, "dataset_fingerprint.json"),
                join(nnUNet_preprocessed, target, "dataset_fingerprint.json"))
    save_json(target_splits(record), join(nnUNet_preprocessed, target, "splits_final.json"))
    preprocess_dataset(args.t, args.p, (args.c,), (args.np,), show_progress_bar=False)
    print(f"{target}: {len(record['labeled'])} labeled, {len(record['pseudo_labeled'])} pseudo-labeled training "
          f"cases, {len(record['val'])} validation cases (fold {args.f}). Train fold {args.f}, e.g. continued from "
          f"the model:\n"
          f"  nnUNetv2_bcp_start_from_model {args.t} {args.c} {args.f} -tr nnUNetTrainer -p {args.p} -m "
          f"{join(model, f'fold_{args.f}', args.chk)}\n  nnUNetv2_train {args.t} {args.c} {args.f} -p {args.p} --c")


if __name__ == "__main__":
    main()
