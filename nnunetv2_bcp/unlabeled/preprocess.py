"""Preprocess unlabeled images with the configuration's own nnU-Net preprocessor, plans and dataset.json.

Input: ``nnUNet_raw/DatasetXXX/imagesUnlabeled``. Output:
``nnUNet_preprocessed/DatasetXXX/{data_identifier}_unlabeled/`` (beside, never inside, nnU-Net's folder), in
nnU-Net's blosc2 format (``.b2nd``, ``_seg.b2nd`` holding only the nonzero mask 0/-1, ``.pkl``) so that nnU-Net's
dataset classes read it. ``bcp_unlabeled.json`` records what the data
was made from; data made with other plans or from changed images is stale and redone. Each case is written
atomically, so an interrupted run resumes where it stopped, and a lock lets several trainings (folds) start at once.
Training needs only ``nnUNet_preprocessed`` once this is done (:func:`unlabeled_cases_for_training`).

Training cases whose labels a label subset drops are not preprocessed here: nnU-Net's own preprocessed image of
such a case is the one we would make, so the stream reads it in place
(:class:`~nnunetv2_bcp.unlabeled.loader.UnlabeledDataset`).
"""
import argparse
import copy
import hashlib
import json
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from importlib.metadata import version
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p
from tqdm import tqdm

from nnunetv2_bcp.unlabeled.raw import (UNLABELED_FOLDER, UnlabeledDataError, check_image_file,
                                        check_unlabeled_images, find_unlabeled_cases, raise_problems,
                                        training_image_ndim)

MANIFEST_FILE = "bcp_unlabeled.json"
FORMAT_VERSION = 1
CASE_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")


def unlabeled_data_folder(preprocessed_dataset_folder: str, data_identifier: str) -> str:
    return join(preprocessed_dataset_folder, data_identifier + "_unlabeled")


def collect_unlabeled_sources(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """Case -> image files of ``imagesUnlabeled``, validated before anything is computed."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    # a copy: nnU-Net makes the paths of a ``dataset`` entry absolute in the dict it is given, which would change the
    # fingerprint of this dataset.json
    training = get_filenames_of_train_images_and_targets(raw_dataset_folder, copy.deepcopy(dataset_json))
    unlabeled = find_unlabeled_cases(raw_dataset_folder, dataset_json)
    raise_problems([f"{unlabeled[c][0]}: case '{c}' also exists in imagesTr; rename the unlabeled case"
                    for c in sorted(set(unlabeled) & set(training))],
                   "Unlabeled case names must differ from training case names")
    check_unlabeled_images(unlabeled, training_image_ndim(training))
    return unlabeled


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The entries of a configuration that nnU-Net's preprocessing reads. Configurations that share a data_identifier
# (one inheriting another's preprocessing with another batch size or network; the cascade's full resolution) differ
# only elsewhere, so they share their unlabeled data as they share nnU-Net's.
PREPROCESSING_ENTRIES = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes",
                         "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                         "resampling_fn_seg_kwargs")


def config_fingerprint(plans: dict, configuration: str, dataset_json: dict, entries=PREPROCESSING_ENTRIES) -> str:
    """Hash of what decides the preprocessed data: the configuration's preprocessing ``entries`` (None: all of its
    resolved entries), the global plans entries (transposition, intensity properties, reader), dataset.json, the
    nnU-Net version and this package's storage format."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    global_plans = {k: v for k, v in plans.items() if k != "configurations"}
    resolved = PlansManager(plans).get_configuration(configuration).configuration
    preprocessing = resolved if entries is None else {k: resolved.get(k) for k in entries}
    return _sha([global_plans, preprocessing, dataset_json, version("nnunetv2"), FORMAT_VERSION])


def made_with_this_preprocessing(fingerprint: Optional[str], plans: dict, configuration: str,
                                 dataset_json: dict) -> bool:
    """Whether data recorded with ``fingerprint`` was made by this configuration's preprocessing: its fingerprint,
    or that of the whole resolved configuration, which covers every preprocessing entry and which some manifests
    hold (their data is kept, not redone)."""
    return fingerprint in (config_fingerprint(plans, configuration, dataset_json),
                           config_fingerprint(plans, configuration, dataset_json, entries=None))


def source_signature(files: List[str]) -> str:
    """Names, sizes and modification times of a case's files: changes when an image is replaced or edited."""
    return _sha([(os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files])


def empty_class_locations(label_manager) -> dict:
    """``class_locations`` with no voxels for every class/region: nnU-Net's loader then crops at random."""
    keys = list(label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels)
    if label_manager.has_ignore_label:
        keys.append(tuple([-1] + label_manager.all_labels))
    return {tuple(k) if isinstance(k, list) else k: np.zeros((0, 4), dtype=np.int64) for k in keys}


def preprocess_unlabeled_case(case: str, image_files: List[str], output_folder: str, plans: dict,
                              configuration: str, dataset_json: dict) -> Tuple[str, Optional[str]]:
    """Preprocess one case exactly as ``nnUNetv2_predict`` would (no label), write it atomically.

    Returns ``(case, None)`` or ``(case, error message naming the file)``; never raises, so that a pool worker
    reports the problem instead of a stack trace.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    try:
        plans_manager = PlansManager(plans)
        cm = plans_manager.get_configuration(configuration)
        reader = plans_manager.image_reader_writer_class()
        try:
            for path in image_files:
                check_image_file(path)
        except UnlabeledDataError as e:
            return case, str(e)
        try:
            data, properties = reader.read_images(image_files)
        except Exception as e:
            return case, f"{image_files[0] if len(image_files) == 1 else image_files}: unreadable image " \
                         f"({type(e).__name__}: {str(e).strip()[:300]})"
        for channel, path in enumerate(image_files):  # readers that keep NaN/inf (checked above for NIfTI)
            if not np.all(np.isfinite(data[channel])):
                return case, f"{path}: contains NaN or infinite voxels"
        preprocessor = cm.preprocessor_class(verbose=False)
        data, seg, properties = preprocessor.run_case_npy(data, None, properties, plans_manager, cm, dataset_json)
        properties["class_locations"] = empty_class_locations(plans_manager.get_label_manager(dataset_json))
        data, seg = data.astype(np.float32, copy=False), seg.astype(np.int16, copy=False)
        blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
        # write into a private folder, then move: a killed run never leaves a half-written case behind
        tmp = join(output_folder, f".tmp_{case}_{os.getpid()}")
        maybe_mkdir_p(tmp)
        nnUNetDatasetBlosc2.save_case(data, seg, properties, join(tmp, case), chunks=chunks, blocks=blocks,
                                      chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        for suffix in CASE_SUFFIXES:
            os.replace(join(tmp, case + suffix), join(output_folder, case + suffix))
        shutil.rmtree(tmp, ignore_errors=True)
        return case, None
    except Exception as e:  # report, never crash the pool
        return case, f"{image_files}: preprocessing failed ({type(e).__name__}: {str(e).strip()[:300]})"


def _star_preprocess(args):
    return preprocess_unlabeled_case(*args)


@contextmanager
def folder_lock(path: str):
    """Exclusive lock on ``path`` (POSIX flock) so that concurrent trainings preprocess once."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; start folds one after the other there
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _remove_case(folder: str, case: str) -> None:
    for suffix in CASE_SUFFIXES:
        if isfile(join(folder, case + suffix)):
            os.remove(join(folder, case + suffix))


def stale_or_missing_cases(output_folder: str, sources: Dict[str, List[str]], fingerprint: str) -> List[str]:
    """Cases that must be (re)computed: not in the manifest, made from other plans/images, or with files missing."""
    manifest = load_json(join(output_folder, MANIFEST_FILE)) if isfile(join(output_folder, MANIFEST_FILE)) else {}
    done = manifest.get("cases", {}) if manifest.get("fingerprint") == fingerprint else {}
    return [c for c, files in sources.items()
            if done.get(c) != source_signature(files)
            or not all(isfile(join(output_folder, c + s)) for s in CASE_SUFFIXES)]


def preprocess_unlabeled(plans: dict, configuration: str, dataset_json: dict, raw_dataset_folder: str,
                         preprocessed_dataset_folder: str, num_processes: int = 4, verbose: bool = True) -> str:
    """Bring ``{data_identifier}_unlabeled`` up to date for ``configuration``; return its path.

    Validates the raw unlabeled images first, then preprocesses only missing or stale cases (in ``num_processes``
    worker processes, with a progress bar) and deletes cases that are no longer wanted. Safe to call from several
    processes at once. Raises :class:`UnlabeledDataError` naming the files on bad input.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    sources = collect_unlabeled_sources(raw_dataset_folder, dataset_json)
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    output_folder = unlabeled_data_folder(preprocessed_dataset_folder, data_identifier)
    maybe_mkdir_p(output_folder)
    fingerprint = config_fingerprint(plans, configuration, dataset_json)
    manifest_path = join(output_folder, MANIFEST_FILE)
    with folder_lock(join(preprocessed_dataset_folder, f".{data_identifier}_unlabeled.lock")):
        manifest = load_json(manifest_path) if isfile(manifest_path) else {}
        if not made_with_this_preprocessing(manifest.get("fingerprint"), plans, configuration, dataset_json):
            manifest = {"fingerprint": fingerprint, "configuration": configuration, "cases": {}}
        elif manifest["fingerprint"] != fingerprint:
            manifest["fingerprint"] = fingerprint
            _write_json_atomic(manifest, manifest_path)
        for name in os.listdir(output_folder):  # leftovers of killed runs
            if name.startswith(".tmp_"):
                shutil.rmtree(join(output_folder, name), ignore_errors=True)
        for case in set(manifest["cases"]) - set(sources):
            _remove_case(output_folder, case)
            del manifest["cases"][case]
        todo = stale_or_missing_cases(output_folder, sources, fingerprint)
        for case in todo:
            manifest["cases"].pop(case, None)
        _write_json_atomic(manifest, manifest_path)
        if verbose:
            print(f"Unlabeled data for {configuration}: {len(sources) - len(todo)} of {len(sources)} cases up to "
                  f"date in {output_folder}" + (f", preprocessing {len(todo)}" if todo else ""))
        if not todo:
            return output_folder
        jobs = [(c, sources[c], output_folder, plans, configuration, dataset_json) for c in todo]
        errors = []
        if num_processes <= 1:
            results = map(_star_preprocess, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs)))
            results = pool.imap_unordered(_star_preprocess, jobs)
        try:
            for case, error in tqdm(results, total=len(jobs), disable=not verbose, desc="unlabeled cases"):
                if error:
                    errors.append(error)
                    continue
                manifest["cases"][case] = source_signature(sources[case])
                _write_json_atomic(manifest, manifest_path)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        raise_problems(errors, f"{len(errors)} unlabeled case(s) could not be preprocessed (the other cases are "
                               f"saved; rerunning redoes only what is missing)")
    return output_folder


def preprocessed_unlabeled_cases(plans: dict, configuration: str, dataset_json: dict,
                                 preprocessed_dataset_folder: str) -> Optional[Tuple[str, List[str]]]:
    """``(folder, cases)`` as recorded in the manifest, without ``nnUNet_raw``; None if there is no manifest.
    Raises :class:`UnlabeledDataError` if the data was made with other plans/dataset.json or files are missing:
    that cannot be redone without the raw images."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    folder = unlabeled_data_folder(preprocessed_dataset_folder, data_identifier)
    manifest_path = join(folder, MANIFEST_FILE)
    if not isfile(manifest_path):
        return None
    manifest = load_json(manifest_path)
    redo = (f"; rerun nnUNetv2_bcp_preprocess_unlabeled (or the training) where nnUNet_raw/"
            f"{os.path.basename(preprocessed_dataset_folder)}/{UNLABELED_FOLDER} is available")
    if not made_with_this_preprocessing(manifest.get("fingerprint"), plans, configuration, dataset_json):
        raise UnlabeledDataError(f"{folder}: the unlabeled cases were preprocessed with other plans, dataset.json or "
                                 f"nnU-Net version than this training's, and the raw images are not here to redo "
                                 f"them{redo}")
    missing = [c for c in manifest["cases"] if not all(isfile(join(folder, c + s)) for s in CASE_SUFFIXES)]
    raise_problems([f"{join(folder, c)}: files missing{redo}" for c in missing],
                   f"{manifest_path} lists cases that are incomplete")
    return folder, sorted(manifest["cases"])


def unlabeled_cases_for_training(plans: dict, configuration: str, dataset_json: dict,
                                 raw_dataset_folder: Optional[str], preprocessed_dataset_folder: str,
                                 num_processes: int = 4, verbose: bool = True,
                                 log: Callable[[str], None] = print) -> Tuple[str, List[str]]:
    """``(folder, cases)``: the preprocessed ``imagesUnlabeled`` cases a training uses.

    Where ``raw_dataset_folder/imagesUnlabeled`` exists, the preprocessed data is brought up to date from it
    (:func:`preprocess_unlabeled`). Otherwise (cluster nodes often mount only ``nnUNet_preprocessed``) the cases of
    the manifest are used as they are, said in ``log``; no manifest either: no cases.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if raw_dataset_folder is not None and os.path.isdir(join(raw_dataset_folder, UNLABELED_FOLDER)):
        folder = preprocess_unlabeled(plans, configuration, dataset_json, raw_dataset_folder,
                                      preprocessed_dataset_folder, num_processes, verbose)
        return folder, sorted(load_json(join(folder, MANIFEST_FILE))["cases"])
    found = preprocessed_unlabeled_cases(plans, configuration, dataset_json, preprocessed_dataset_folder)
    if found is None:
        data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
        return unlabeled_data_folder(preprocessed_dataset_folder, data_identifier), []
    where = join(raw_dataset_folder, UNLABELED_FOLDER) if raw_dataset_folder else "nnUNet_raw (not available here)"
    log(f"{where} not found: training with the {len(found[1])} unlabeled cases preprocessed in {found[0]} as "
        f"recorded in its {MANIFEST_FILE} (their staleness against the raw images is not checked)")
    return found


def preprocess_unlabeled_for_dataset(dataset: str, configurations: List[str], plans_identifier: str = "nnUNetPlans",
                                     num_processes: int = 4, verbose: bool = True) -> List[str]:
    """:func:`preprocess_unlabeled` for a dataset name/id, reading plans and dataset.json like nnU-Net does."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    dataset_name = maybe_convert_to_dataset_name(dataset)
    preprocessed = join(nnUNet_preprocessed, dataset_name)
    plans_file = join(preprocessed, plans_identifier + ".json")
    if not isfile(plans_file):
        raise UnlabeledDataError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans = load_json(plans_file)
    dataset_json = load_json(join(preprocessed, "dataset.json"))
    unknown = [c for c in configurations if c not in plans["configurations"]]
    if unknown:
        raise UnlabeledDataError(f"{plans_file} has no configuration {unknown}; it has "
                                 f"{sorted(plans['configurations'])}")
    return [preprocess_unlabeled(plans, c, dataset_json, join(nnUNet_raw, dataset_name), preprocessed,
                                 num_processes, verbose) for c in configurations]


def _preprocessed_configurations(plans_file: str) -> List[str]:
    """The configurations whose data nnU-Net has preprocessed, one per data folder."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if not isfile(plans_file):
        return []
    plans_manager = PlansManager(load_json(plans_file))
    by_folder = {}
    for c in plans_manager.available_configurations:
        by_folder.setdefault(plans_manager.get_configuration(c).data_identifier, c)
    return [c for folder, c in by_folder.items() if os.path.isdir(join(os.path.dirname(plans_file), folder))]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Preprocess the unlabeled images of a dataset (nnUNet_raw/DatasetXXX/imagesUnlabeled) for BCP, "
                    "with the dataset's own nnU-Net plans (a label subset's label-dropped training cases are read "
                    "from nnU-Net's own preprocessed data). "
                    "nnUNetv2_train -tr nnUNetTrainerBCP does this automatically when the data is missing or stale.")
    parser.add_argument("-d", nargs="+", required=True, help="dataset name(s) or id(s)")
    parser.add_argument("-c", nargs="+", default=None,
                        help="configurations (default: every configuration nnU-Net has preprocessed)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-np", type=int, default=4, help="number of worker processes (default 4)")
    parser.add_argument("--verbose", action="store_true", help="unused; nnU-Net compatibility")
    args = parser.parse_args(argv)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    for dataset in args.d:
        plans_file = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset), args.plans + ".json")
        configurations = args.c
        if configurations is None:  # the configurations nnU-Net has preprocessed data for
            configurations = _preprocessed_configurations(plans_file) or ["3d_fullres"]
        try:
            preprocess_unlabeled_for_dataset(dataset, configurations, args.plans, args.np)
        except UnlabeledDataError as e:
            raise SystemExit(f"ERROR: {e}")


if __name__ == "__main__":
    main()
