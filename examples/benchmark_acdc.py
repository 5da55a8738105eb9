"""ACDC, the BCP paper's own benchmark, inside nnU-Net (2d): BCP against nnU-Net alone and against nnU-Net with
offline pseudo-labels, on the paper's labeled patients.

    # once: ACDC's h5 files (../shared/data/ACDC) -> nnUNet_raw/Dataset627_ACDC, planned and preprocessed (2d), a
    # plans variant with the batch size of the benchmark (needs h5py: pip install h5py)
    python examples/benchmark_acdc.py prepare --acdc ../shared/data/ACDC -w bench_acdc --batch-size 4
    # the arms of one labeled set, in order (L first; each row is appended as it lands; a stopped run resumes)
    python examples/benchmark_acdc.py protocol -w bench_acdc --labeled-set paper3 --iterations 1000
    # the same from a converged L: L's budgets double from 1000 until the doubling gains < 0.01 validation Dice
    python examples/benchmark_acdc.py protocol -w bench_acdc --labeled-set paper3 --from-iterations converged \
        --iterations 300
    # one arm on its own
    python examples/benchmark_acdc.py run -w bench_acdc --arm labeled --labeled-set paper3 --iterations 2000
    python examples/benchmark_acdc.py run -w bench_acdc --arm pseudo_continue --labeled-set paper3
    # paired tables (validation patients; test predictions are only written, never scored here), L's curve
    python examples/benchmark_acdc.py table
    python examples/benchmark_acdc.py curve -w bench_acdc --run labeled_paper3_it1000
    # HD95 and the largest-component metrics of kept models whose rows lack them (needs MONAI: pip install monai)
    python examples/benchmark_acdc.py add-metrics -w bench_acdc

Data. ``train.list``'s 70 patients are fold 0's training cases and ``val.list``'s 10 patients its validation cases
(``splits_final.json``), both frames (ED, ES) of a patient always on the same side. Labeled sets (``LABELED_SETS``):
the paper's 3 and 7 patients (the first patients of ``train_slices.list``) and seeded random sets of 3 (``random3_s<N>``);
the other training patients are unlabeled data: BCP reads their preprocessed images only (the plugin's label subset),
and their labels are never opened in training. The 20 test patients (``test_images/``, images only) are not part of the
dataset: every final model predicts them, the label maps are copied to ``examples/results/acdc_test_predictions/<run>/``
for an independent evaluation, and nothing here reads them otherwise. Spacing: the h5 files keep none; every volume gets
the nominal (x, y, z) = (1.5625, 1.5625, 10) mm, so nnU-Net resamples nothing.

Arms (every continuation starts from all weights of the same labeled-only model L of its labeled set):
``labeled`` L = nnU-Net on the labeled patients; ``labeled_continue`` (a) = L continued as nnU-Net;
``bcp_continue`` (b) = BCP from L with the plugin's defaults; ``pseudo_continue`` (c) = the offline pseudo-label recipe
(``nnUNetv2_bcp_pseudo_label_dataset``: L predicts the unlabeled training patients, nnU-Net continues from L on the
labeled + pseudo-labeled patients); ``bcp`` (d) = ``nnUNetTrainerBCP`` from scratch with the plugin's defaults, for the
iterations of L + (b); ``ceiling`` (e) = nnU-Net on all 70 training patients for the iterations of L + (a). Metrics:
nnU-Net's evaluation (Dice, IoU) of each final checkpoint on the 20 validation volumes, per class (RV, MYO, LV) and
per volume; HD95 in voxels (MONAI); the same once each class keeps its largest component (every arm alike);
``table`` pairs each arm with (a) and (c) per volume (bootstrap interval and Wilcoxon test over patients: a
patient's two frames are not independent).
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p, save_json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchmark_label_scarce as common  # noqa: E402  (the Hippocampus protocol's run folders, resume, statistics)

DATASET_ID = 627
DATASET_NAME = f"Dataset{DATASET_ID}_ACDC"
CONFIGURATION = "2d"
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
CLASSES = [1, 2, 3]
NOMINAL_SPACING = (1.5625, 1.5625, 10.0)  # (x, y, z) mm: the h5 files keep none
PAPER_LABELED_PATIENTS = 7  # the first patients of train_slices.list: the paper's 10 % set; its first 3 are the 5 %
RESULTS = join(HERE, "results", "acdc.jsonl")
# HD95 and the largest-component metrics of rows without these fields (``add-metrics``), one line per training
EXTRA_RESULTS = join(HERE, "results", "acdc_extra_metrics.jsonl")
LARGEST_COMPONENT = "largest_component"  # the prefix of the metrics after keeping each class's largest component
TEST_PREDICTIONS = join(HERE, "results", "acdc_test_predictions")
DOCS = join(HERE, os.pardir, "docs", "benchmarks.md")
TABLE_START, TABLE_END = "<!-- acdc-table:start -->", "<!-- acdc-table:end -->"
ARMS = ("labeled", "labeled_continue", "bcp_continue", "pseudo_continue", "bcp", "ceiling")
CONTINUE_ARMS = ("labeled_continue", "bcp_continue", "pseudo_continue")
# nnU-Net's trainers of the Hippocampus benchmark (its schedule from the environment): L and (a) train on the label
# subset, (c) and (e) on every training case of their dataset, (b) and (d) are BCP
ARM_TRAINERS = {"labeled": "BenchLabeled", "labeled_continue": "BenchLabeled", "bcp_continue": "BenchBCP",
                "pseudo_continue": "BenchCeiling", "bcp": "BenchBCP", "ceiling": "BenchCeiling"}
# BenchBCP trains the paper's configuration changed by its settings: common.plugin_defaults make it the plugin's
PLUGIN_DEFAULTS = common.PLUGIN_DEFAULTS
# L's budget search (``protocol --from-iterations converged``): budgets double; L is converged at the smallest budget
# whose doubling gains less than this in mean validation Dice
CONVERGENCE_GAIN = 0.01


# ------------------------------------------------------------------------------------------------------- data
def patients_of(volumes):
    """``patient099`` of ``patient099_frame01`` (and of ``patient099_frame01_slice_3``), in first-seen order."""
    seen = []
    for volume in volumes:
        patient = volume.split("_")[0]
        if patient not in seen:
            seen.append(patient)
    return seen


def labeled_sets(acdc: str) -> dict:
    """``{"paper3": [...], "paper7": [...], "random3_s1": [...], ...}``: the labeled patients of each set."""
    train_patients = patients_of(open(join(acdc, "train.list")).read().split())
    paper = patients_of(open(join(acdc, "train_slices.list")).read().split())[:PAPER_LABELED_PATIENTS]
    sets = {"paper3": paper[:3], "paper7": paper}
    for seed in (1, 2):
        sets[f"random3_s{seed}"] = sorted(np.random.default_rng(seed).choice(sorted(train_patients), 3,
                                                                            replace=False).tolist())
    return sets


def read_volume(acdc: str, volume: str, folder: str = "data"):
    """Image and label (None where it is held out) of one volume as (z, y, x) arrays; training volumes are stored as
    slices ``<volume>_slice_<S>.h5``, S = 1..N, and stacked back."""
    import h5py
    whole = join(acdc, folder, f"{volume}.h5")
    if isfile(whole):
        with h5py.File(whole, "r") as f:
            return f["image"][()], (f["label"][()] if "label" in f else None)
    images, labels = [], []
    s = 1
    while isfile(join(acdc, folder, f"{volume}_slice_{s}.h5")):
        with h5py.File(join(acdc, folder, f"{volume}_slice_{s}.h5"), "r") as f:
            images.append(f["image"][()])
            labels.append(f["label"][()])
        s += 1
    if not images:
        raise SystemExit(f"{join(acdc, folder)}: neither {volume}.h5 nor {volume}_slice_1.h5")
    return np.stack(images), np.stack(labels)


def write_nifti(array, path: str) -> None:
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(NOMINAL_SPACING)
    sitk.WriteImage(image, path)


def volume_lists(acdc: str) -> tuple:
    """The training, validation and test volumes of the h5 distribution."""
    train = open(join(acdc, "train.list")).read().split()
    val = open(join(acdc, "val.list")).read().split()
    test = sorted(f[:-len(".h5")] for f in os.listdir(join(acdc, "test_images")) if f.endswith(".h5"))
    return train, val, test


def convert(acdc: str, raw_root: str) -> str:
    """ACDC's h5 distribution -> nnU-Net's raw layout (``write_raw``)."""
    train, val, test = volume_lists(acdc)
    return write_raw(raw_root, train, val, test, labeled_sets(acdc),
                     lambda volume, is_test: read_volume(acdc, volume, "test_images" if is_test else "data"))


def write_raw(raw_root: str, train: list, val: list, test: list, sets: dict, read, omitted: list = ()) -> str:
    """Training and validation volumes with their labels in imagesTr/labelsTr, the test volumes' images in imagesTs
    (``read(volume, is_test)`` -> image, label); ``acdc_split.json`` records the lists, the labeled sets and the
    training volumes a compact copy left out."""
    folder = join(raw_root, DATASET_NAME)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        maybe_mkdir_p(join(folder, sub))
    for volume in train + val:
        image, label = read(volume, False)
        write_nifti(image.astype(np.float32), join(folder, "imagesTr", f"{volume}_0000.nii.gz"))
        write_nifti(label.astype(np.uint8), join(folder, "labelsTr", f"{volume}.nii.gz"))
    for volume in test:
        image, _ = read(volume, True)
        write_nifti(image.astype(np.float32), join(folder, "imagesTs", f"{volume}_0000.nii.gz"))
    save_json({"channel_names": {"0": "cineMRI"}, "labels": LABELS, "file_ending": ".nii.gz",
               "numTraining": len(train) + len(val), "name": "ACDC",
               "description": "ACDC 2017 ED/ES frames from the SSL4MIS/BCP h5 distribution; nominal spacing "
                              f"{NOMINAL_SPACING} mm (x, y, z); the standard train/val lists, test images in imagesTs"},
              join(folder, "dataset.json"), sort_keys=False)
    save_json({"train": train, "val": val, "test": test, "labeled_sets": sets, "omitted_train": list(omitted)},
              join(folder, "acdc_split.json"), sort_keys=False)
    return folder


# ACDC for a machine that gets at most 64 MiB per call (the device tool's): each volume's image as the integers it was
# normalised from (uint16, one step per volume; the step back gives the float image to 1e-4) in an xz-compressed
# .npy, its label beside it; the test images in a folder of their own (they travel in another call).
COMPACT_MANIFEST = "acdc_compact.json"


def _write_compact_volume(folder: str, volume: str, image, label) -> tuple:
    """Write one volume; return ([step, offset] back to the float image, bytes written)."""
    import io
    import lzma
    values = np.unique(image)
    step, offset = (float(np.diff(values).min()) if len(values) > 1 else 1.0), 0.0
    integers = np.round(image / step)
    if values[0] < 0 or integers.max() > np.iinfo(np.uint16).max or np.abs(integers * step - image).max() > 1e-4:
        offset = float(values[0])  # not integers: 16-bit steps from the minimum
        step = float(values[-1] - offset) / np.iinfo(np.uint16).max or 1.0
        integers = np.round((image - offset) / step)
    size = 0
    for suffix, array in (("image", integers.astype(np.uint16)), ("label", label)):
        if array is None:
            continue
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array))
        path = join(folder, f"{volume}_{suffix}.npy.xz")
        with open(path, "wb") as f:
            f.write(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
        size += os.path.getsize(path)
    return [step, offset], size


def _write_compact_groups(acdc: str, folder: str, groups: list, source: str, limit_mb: float = None,
                          always_kept: int = 0):
    """Each group of volumes (those that must stay together: a patient's two frames, or a whole list) from ACDC's
    ``source`` folder into ``folder``; past the first ``always_kept`` groups, a group that would take the total past
    ``limit_mb`` is left out. Returns ({volume: (step, offset)}, the volumes kept, bytes written)."""
    maybe_mkdir_p(folder)
    steps, total, kept = {}, 0, []
    for i, group in enumerate(groups):
        sizes = {}
        for volume in group:
            image, label = read_volume(acdc, volume, source)
            steps[volume], sizes[volume] = _write_compact_volume(folder, volume, image, label)
        if limit_mb is not None and i >= always_kept and total + sum(sizes.values()) > limit_mb * 1e6:
            for volume in group:
                steps.pop(volume)
                for suffix in ("image", "label"):
                    os.remove(join(folder, f"{volume}_{suffix}.npy.xz"))
            continue
        total += sum(sizes.values())
        kept += group
    return steps, kept, total


def compact(args):
    """The validation volumes, every labeled set's patients and as many other training patients (whole, in a seeded
    order) as ``--max-mb`` allows into ``--out``; the test images into ``--out-test``."""
    acdc = os.path.abspath(args.acdc)
    train, val, test = volume_lists(acdc)
    sets = labeled_sets(acdc)
    labeled = {p for patients in sets.values() for p in patients}
    others = sorted(set(patients_of(train)) - labeled)
    others = [others[i] for i in np.random.default_rng(args.seed).permutation(len(others))]
    groups = [val, [v for v in train if v.split("_")[0] in labeled]]
    groups += [[v for v in train if v.split("_")[0] == p] for p in others]
    steps, kept, total = _write_compact_groups(acdc, args.out, groups, "data", args.max_mb, always_kept=2)
    omitted = [v for v in train if v not in kept]
    save_json({"train": [v for v in train if v in kept], "val": val, "test": test, "labeled_sets": sets,
               "omitted_train": omitted, "steps": steps}, join(args.out, COMPACT_MANIFEST), sort_keys=False)
    print(f"{args.out}: {len(steps)} volumes, {total / 1e6:.1f} MB; {len(omitted)} unlabeled training volumes left "
          f"out", flush=True)
    steps, _, total = _write_compact_groups(acdc, args.out_test, [test], "test_images")
    save_json({"train": [], "val": [], "test": test, "labeled_sets": sets, "omitted_train": [], "steps": steps},
              join(args.out_test, COMPACT_MANIFEST), sort_keys=False)
    print(f"{args.out_test}: {len(steps)} volumes, {total / 1e6:.1f} MB", flush=True)


def convert_compact(folders: list, raw_root: str) -> str:
    """``compact``'s folders (training side, test side) -> nnU-Net's raw layout (``write_raw``)."""
    import io
    import lzma
    manifests = {folder: load_json(join(folder, COMPACT_MANIFEST)) for folder in folders}
    where = {volume: folder for folder, m in manifests.items() for volume in m["steps"]}
    first = next(m for m in manifests.values() if m["train"])

    def load(folder, name):
        with open(join(folder, name), "rb") as f:
            return np.load(io.BytesIO(lzma.decompress(f.read())))

    def read(volume, is_test):
        if volume not in where:
            raise SystemExit(f"{volume} is in none of {folders}: give the training and the test folders of compact")
        folder = where[volume]
        step, offset = manifests[folder]["steps"][volume]
        image = load(folder, f"{volume}_image.npy.xz").astype(np.float32) * np.float32(step) + np.float32(offset)
        return image, (None if is_test else load(folder, f"{volume}_label.npy.xz"))

    return write_raw(raw_root, first["train"], first["val"], first["test"], first["labeled_sets"], read,
                     first["omitted_train"])


def plans_name(batch_size: int) -> str:
    return f"nnUNetPlans_bs{batch_size}"


def prepare(args):
    env = common.environment(args.work_dir)
    if args.compact:
        folder = convert_compact([os.path.abspath(f) for f in args.compact], env["nnUNet_raw"])
    else:
        folder = convert(os.path.abspath(args.acdc), env["nnUNet_raw"])
    common.sh(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "2"], env)
    pre = join(env["nnUNet_preprocessed"], DATASET_NAME)
    plans = load_json(join(pre, "nnUNetPlans.json"))
    print(f"nnU-Net's {CONFIGURATION} plans: batch size {plans['configurations'][CONFIGURATION]['batch_size']}, "
          f"patch {plans['configurations'][CONFIGURATION]['patch_size']}", flush=True)
    plans["plans_name"] = plans_name(args.batch_size)
    plans["configurations"][CONFIGURATION]["batch_size"] = args.batch_size  # same preprocessed data
    save_json(plans, join(pre, plans["plans_name"] + ".json"), sort_keys=False)
    split = load_json(join(folder, "acdc_split.json"))
    save_json([{"train": split["train"], "val": split["val"]}], join(pre, "splits_final.json"))
    save_json({"batch_size": args.batch_size, "plans": plans["plans_name"]}, join(args.work_dir, "acdc_bench.json"))
    print(f"{len(split['train'])} training, {len(split['val'])} validation, {len(split['test'])} test volumes; "
          f"labeled sets {split['labeled_sets']}")



# ------------------------------------------------------------------------------------------------------- runs
def label_subset(split: dict, labeled_set: str, splits: list) -> dict:
    """The plugin's label subset of fold 0: both frames of the set's patients keep their labels."""
    from nnunetv2_bcp.unlabeled.label_subset import choose_label_subset
    if labeled_set not in split["labeled_sets"]:
        raise SystemExit(f"--labeled-set {labeled_set}: not one of {sorted(split['labeled_sets'])}")
    patients = set(split["labeled_sets"][labeled_set])
    cases = [c for c in split["train"] if c.split("_")[0] in patients]
    subset = choose_label_subset(split["train"] + split["val"], splits, labeled_cases=cases)
    subset["folds"].pop("all")  # fold 'all' would train on the validation patients too
    subset["labeled_patients"] = sorted(patients)
    return subset


def run_name(arm: str, labeled_set: str, iterations: int, from_iterations: int = None, suffix: str = "") -> str:
    """``labeled_paper3_it1000``, ``bcp_continue_paper3_it500_from1000``, ``ceiling_it1500``; ``suffix`` tells runs
    of another series apart (e.g. ``_gpu``: another machine, a compact copy of the data)."""
    name = arm if arm == "ceiling" else f"{arm}_{labeled_set}"
    name += f"_it{iterations}"
    return name + (f"_from{from_iterations}" if arm in CONTINUE_ARMS else "") + suffix


def evaluate_folder(labels: str, predictions: str, output: str) -> dict:
    """nnU-Net's evaluation (Dice, IoU per class and case) of the label maps in ``predictions``, written to ``output``
    and read back from it: the file's class keys are strings (those of the dict nnU-Net returns are not)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    compute_metrics_on_folder(labels, predictions, output, SimpleITKIO(), ".nii.gz", CLASSES, num_processes=2)
    return load_json(output)


def summary_metrics(path: str, prefix: str = "validation") -> dict:
    """Dice and IoU per class and per volume from nnU-Net's evaluation (``summary.json``), as ``<prefix>_...``."""
    if not isfile(path):
        raise SystemExit(f"{path} is missing: the training did not finish its validation")
    summary = load_json(path)
    per_case = {}
    for entry in summary["metric_per_case"]:
        case = os.path.basename(entry["reference_file"])[:-len(".nii.gz")]
        per_case[case] = {str(c): {m: entry["metrics"][str(c)][m] for m in ("Dice", "IoU")} for c in CLASSES}
    return {f"{prefix}_dice_mean": summary["foreground_mean"]["Dice"],
            f"{prefix}_iou_mean": summary["foreground_mean"]["IoU"],
            f"{prefix}_dice_per_class": {str(c): summary["mean"][str(c)]["Dice"] for c in CLASSES},
            f"{prefix}_iou_per_class": {str(c): summary["mean"][str(c)]["IoU"] for c in CLASSES},
            f"{prefix}_per_case": per_case, f"{prefix}_num_cases": len(per_case)}


def validation_metrics(fold_folder: str) -> dict:
    """Dice and IoU per class and per volume of nnU-Net's final validation (the 20 validation volumes)."""
    return summary_metrics(join(fold_folder, "validation", "summary.json"))


def hd95_per_case(predictions: str, labels: str) -> dict:
    """HD95 per volume and class, in voxels (the spacing is nominal; the paper's evaluation measures in voxels too):
    MONAI's ``compute_hausdorff_distance``, the larger of the two directed 95th percentiles of the surface distances
    (the paper's medpy ``hd95`` takes one percentile of both directions pooled, which is never larger), for every label
    map in ``predictions`` against its namesake in ``labels``. ``None`` where the prediction or the reference lacks the
    class (the paper's evaluation code scores a class missing from the prediction as 0)."""
    import warnings
    import SimpleITK as sitk
    import torch
    from monai.metrics import compute_hausdorff_distance

    def one_hot(path):
        array = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.int64))
        return torch.stack([array == c for c in CLASSES])[None]

    per_case = {}
    for f in sorted(f for f in os.listdir(predictions) if f.endswith(".nii.gz")):
        prediction, reference = one_hot(join(predictions, f)), one_hot(join(labels, f))
        with warnings.catch_warnings():  # a class missing from a map: counted in hd95_summary, not warned per volume
            warnings.simplefilter("ignore")
            distances = compute_hausdorff_distance(prediction, reference, include_background=True, percentile=95)[0]
        per_case[f[:-len(".nii.gz")]] = {str(c): None if not torch.isfinite(d) else float(d)
                                         for c, d in zip(CLASSES, distances)}
    return per_case


def hd95_summary(per_case: dict, prefix: str = "validation") -> dict:
    """Per class the mean HD95 over the volumes where it is defined and the number where it is not (the class missing
    from the prediction or the reference); their mean over the classes (``<prefix>_hd95_...``)."""
    per_class = {str(c): [v[str(c)] for v in per_case.values()] for c in CLASSES}
    means = {c: float(np.mean([d for d in values if d is not None])) if any(d is not None for d in values) else None
             for c, values in per_class.items()}
    return {f"{prefix}_hd95_mean": float(np.mean(list(means.values()))) if None not in means.values() else None,
            f"{prefix}_hd95_per_class": means,
            f"{prefix}_hd95_undefined": {c: sum(d is None for d in values) for c, values in per_class.items()},
            f"{prefix}_hd95_per_case": per_case}


def keep_largest_components(predictions: str, out: str) -> str:
    """Each label map of ``predictions`` with only the largest component of each class, in ``out``: nnU-Net's
    ``remove_all_but_largest_component_from_segmentation`` once per class (the step that
    ``nnUNetv2_determine_postprocessing`` may choose per class), applied to every class of every arm alike, so nothing
    is tuned."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.postprocessing.remove_connected_components import (
        load_postprocess_save, remove_all_but_largest_component_from_segmentation)
    shutil.rmtree(out, ignore_errors=True)
    maybe_mkdir_p(out)
    for f in sorted(f for f in os.listdir(predictions) if f.endswith(".nii.gz")):
        load_postprocess_save(join(predictions, f), join(out, f), SimpleITKIO(),
                              [remove_all_but_largest_component_from_segmentation] * len(CLASSES),
                              [{"labels_or_regions": c} for c in CLASSES])
    return out


def extra_metrics(fold_folder: str, labels: str, work: str) -> dict:
    """Beside nnU-Net's evaluation of the final validation: its HD95 (``validation_hd95_...``), and Dice, IoU and HD95
    once each class keeps only its largest component (``largest_component_...``), where MONAI is installed (the
    benchmark extra). The post-processed maps go to ``work`` and are removed after."""
    try:
        import monai  # noqa: F401
    except ImportError:
        print("HD95 and the largest-component metrics not computed: MONAI is not installed (pip install monai)",
              flush=True)
        return {}
    validation = join(fold_folder, "validation")
    metrics = hd95_summary(hd95_per_case(validation, labels))
    kept = keep_largest_components(validation, work)
    evaluate_folder(labels, kept, join(kept, "summary.json"))
    metrics.update(summary_metrics(join(kept, "summary.json"), LARGEST_COMPONENT))
    metrics.update(hd95_summary(hd95_per_case(kept, labels), LARGEST_COMPONENT))
    shutil.rmtree(kept, ignore_errors=True)
    return metrics


def pseudo_label_quality(env: dict, raw: str, target_raw: str, work: str, name: str) -> dict:
    """Dice of the pseudo-labels against the held-back labels of the unlabeled training patients (for choosing between
    candidates; never used in training)."""
    record = load_json(join(target_raw, "bcp_pseudo_labels.json"))
    folder = join(work, f"pseudo_labels_{name}")
    shutil.rmtree(folder, ignore_errors=True)
    maybe_mkdir_p(folder)
    for case in record["pseudo_labeled"]:
        os.symlink(os.path.realpath(join(target_raw, "labelsTr", f"{case}.nii.gz")), join(folder, f"{case}.nii.gz"))
    summary = evaluate_folder(join(raw, "labelsTr"), folder, join(folder, "summary.json"))
    return {"pseudo_label_dice_mean": summary["foreground_mean"]["Dice"],
            "pseudo_label_dice_per_class": {str(c): summary["mean"][str(c)]["Dice"] for c in CLASSES},
            "pseudo_labeled_cases": len(record["pseudo_labeled"])}


CODE_PER_START = "bench_code_per_start.json"  # in <work>/runs/<run>: the code of each start of the run


def code_per_start(run_dir: str, resumed: bool) -> list:
    """The code versions the run trained with, one per start, this one last: a run resumed after the code changed
    was trained by more than one."""
    path = join(run_dir, CODE_PER_START)
    codes = load_json(path) if resumed and isfile(path) else []
    codes.append(common.code_version())
    save_json(codes, path)
    return codes


def epoch_seconds(checkpoint: str) -> float:
    """The time the training epochs took, from nnU-Net's log in the checkpoint (start-up, the final validation and the
    epochs an interruption lost are not counted; the epochs before a resume are)."""
    import torch
    times = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    return sum(end - begin for begin, end in zip(times["epoch_start_timestamps"], times["epoch_end_timestamps"]))


def reproduce_command(args) -> str:
    parts = ["python examples/benchmark_acdc.py run", f"--arm {args.arm}"]
    parts += [f"--labeled-set {args.labeled_set}"] * (args.arm != "ceiling")
    parts += [f"--iterations {args.iterations}"]
    parts += [f"--from-iterations {args.from_iterations}"] * (args.arm in CONTINUE_ARMS)
    parts += [f"--test-images {args.test_images}"] * bool(args.test_images)
    parts += [f"--name-suffix {args.name_suffix}"] * bool(args.name_suffix)
    return " ".join(parts)


def run(args) -> dict:
    from nnunetv2_bcp.demo.run_demo import SMALL_MACHINE_ENVIRONMENT
    work = args.work_dir
    bench = load_json(join(work, "acdc_bench.json"))
    plans = bench["plans"]
    env = common.environment(work)
    raw = join(env["nnUNet_raw"], DATASET_NAME)
    split = load_json(join(raw, "acdc_split.json"))
    splits = load_json(join(env["nnUNet_preprocessed"], DATASET_NAME, "splits_final.json"))
    subset = None if args.arm == "ceiling" else label_subset(split, args.labeled_set, splits)
    from_run = None
    if args.arm in CONTINUE_ARMS:
        from_run = run_name("labeled", args.labeled_set, args.from_iterations, suffix=args.name_suffix)
        if not isfile(join(work, "models", from_run, "fold_0", "checkpoint_final.pth")):
            print(f"{from_run} is not in {join(work, 'models')}: training it first", flush=True)
            run(argparse.Namespace(**{**vars(args), "arm": "labeled", "iterations": args.from_iterations}))
    start_checkpoint = join(work, "models", from_run, "fold_0", "checkpoint_final.pth") if from_run else None
    name = run_name(args.arm, args.labeled_set, args.iterations, args.from_iterations, args.name_suffix)
    trainer = ARM_TRAINERS[args.arm]
    settings = common.plugin_defaults(from_scratch=not from_run) if trainer == "BenchBCP" else {}
    train_id = DATASET_ID + 1 if args.arm == "pseudo_continue" else DATASET_ID
    train_dataset = f"Dataset{train_id:03d}_ACDC" + ("Pseudo" if args.arm == "pseudo_continue" else "")
    epochs = args.iterations // args.iterations_per_epoch
    run_dir = join(work, "runs", name)
    results_folder = join(run_dir, "nnUNet_results", train_dataset, f"{trainer}__{plans}__{CONFIGURATION}")
    fold_dir = join(results_folder, "fold_0")
    from_checkpoint = common.checkpoint_id(start_checkpoint) if from_run else None
    started = {"run": name, "epochs": epochs, "iterations_per_epoch": args.iterations_per_epoch, "plans": plans,
               "settings": settings, "device": args.device, "from_checkpoint": from_checkpoint,
               "environment": {n: env[n] for n in SMALL_MACHINE_ENVIRONMENT}}
    earlier = common.interrupted_run(run_dir, fold_dir, started)
    env, _ = common.run_environment(work, name, subset, resume=earlier is not None, dataset=DATASET_NAME)
    if earlier is None:
        save_json(started, join(run_dir, common.RUN_START), sort_keys=False)
    codes = code_per_start(run_dir, resumed=earlier is not None)
    # the run's own raw root: (c) writes its pseudo-labeled dataset there
    own_raw = join(run_dir, "nnUNet_raw")
    if not os.path.isdir(join(own_raw, DATASET_NAME)):
        maybe_mkdir_p(own_raw)
        os.symlink(raw, join(own_raw, DATASET_NAME))
    env.update(nnUNet_raw=own_raw, BENCH_EPOCHS=str(epochs), BENCH_ITERATIONS=str(args.iterations_per_epoch),
               BENCH_SETTINGS=json.dumps(settings), BENCH_NO_MIRRORING="1")
    if from_run:
        env["BENCH_CONTINUE"] = "1"
    log = join(work, f"{name}.log")
    train_cmd = ["nnUNetv2_train", str(train_id), CONFIGURATION, "0", "-p", plans, "-tr", trainer, "-device",
                 args.device]
    start = time.time()
    extra = {}
    if earlier is not None:
        print(f"{name}: resuming the interrupted run from {os.path.basename(earlier['checkpoint'])} (epoch "
              f"{earlier['epoch']} of {epochs}; delete {run_dir} to start it over)", flush=True)
        train_cmd.append("--c")
    elif from_run:
        if args.arm == "pseudo_continue":
            begin = time.time()
            common.sh(["nnUNetv2_bcp_pseudo_label_dataset", "-d", str(DATASET_ID), "-t", str(train_id), "-c",
                       CONFIGURATION, "-f", "0", "-p", plans, "-m", join(work, "models", from_run), "-device",
                       args.device, "-np", "2"], env, log)
            extra["pseudo_label_seconds"] = round(time.time() - begin)
        common.sh(["nnUNetv2_bcp_start_from_model", str(train_id), CONFIGURATION, "0", "-tr", trainer, "-p", plans,
                   "-m", start_checkpoint], env, log)
        train_cmd.append("--c")
    common.sh(train_cmd, env, log)
    train_seconds = epoch_seconds(join(fold_dir, "checkpoint_final.pth"))
    if args.arm == "pseudo_continue":
        extra.update(pseudo_label_quality(env, raw, join(own_raw, train_dataset), work, name))
    # the test images: predicted, never scored here (their labels are held out)
    test_images = args.test_images or join(raw, "imagesTs")
    pred = join(work, f"pred_{name}")
    shutil.rmtree(pred, ignore_errors=True)
    common.sh(["nnUNetv2_predict", "-i", test_images, "-o", pred, "-d", str(train_id), "-c", CONFIGURATION, "-p",
               plans, "-f", "0", "-tr", trainer, "-device", args.device, "-npp", "1", "-nps", "1"], env, log)
    predictions = join(args.predictions, name)
    shutil.rmtree(predictions, ignore_errors=True)
    maybe_mkdir_p(predictions)
    for f in sorted(os.listdir(pred)):
        if f.endswith(".nii.gz"):
            shutil.copy(join(pred, f), join(predictions, f))
    iterations = epochs * args.iterations_per_epoch
    result = {"run": name, "arm": args.arm, "labeled_set": None if args.arm == "ceiling" else args.labeled_set,
              "labeled_patients": subset["labeled_patients"] if subset else split["train"],
              "iterations": iterations, "from": from_run, "from_checkpoint": from_checkpoint,
              "from_iterations": args.from_iterations if from_run else None, "settings": settings,
              "configuration": CONFIGURATION, "plans": plans, "batch_size": bench["batch_size"],
              "inference_mirroring": False, "device": args.device, "trainer": trainer,
              "training_volumes_left_out": len(split.get("omitted_train", [])),  # by a compact copy
              "train_seconds": round(train_seconds), "seconds_per_iteration": round(train_seconds / iterations, 3),
              "wall_seconds": round(time.time() - start), **extra,
              "test_predictions": os.path.relpath(predictions, os.path.join(HERE, os.pardir)),
              "test_images": os.path.abspath(test_images), "date": time.strftime("%Y-%m-%d"),
              "environment": started["environment"], "code": common.code_version(), "command": reproduce_command(args)}
    result.update(validation_metrics(fold_dir))
    try:  # optional figures: a failure here must not lose the trained run (add-metrics can compute them later)
        result.update(extra_metrics(fold_dir, join(raw, "labelsTr"), join(work, f"largest_component_{name}")))
    except Exception as error:  # noqa: BLE001
        print(f"{name}: HD95 and the largest-component metrics failed ({error!r}); run add-metrics later", flush=True)
    if earlier is not None:
        result["resumed_at_epoch"] = earlier["epoch"]
    if len(set(codes)) > 1:
        result["code_per_start"] = codes
    if trainer == "BenchBCP":
        result["bcp_settings"] = load_json(join(fold_dir, "bcp_settings.json"))
    kept = join(work, "models", name)
    maybe_mkdir_p(os.path.dirname(kept))
    shutil.rmtree(kept, ignore_errors=True)
    shutil.move(results_folder, kept)
    common.append_row(args.results, result)
    save_json(result, join(kept, "result.json"), sort_keys=False)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "validation_per_case"}), flush=True)
    return result


def converged_budget(validation_dice: dict, start: int) -> tuple:
    """The reading rule of L's budget search, on ``{iterations: mean validation Dice}`` of L's trained so far, whose
    budgets double from ``start``: ``(budget, None)`` for the converged L, the smallest budget whose doubling gains
    less than ``CONVERGENCE_GAIN``; ``(None, budget)`` for the budget to train next."""
    budget = start
    while budget in validation_dice:
        doubled = 2 * budget
        if doubled not in validation_dice:
            return None, doubled
        if validation_dice[doubled] - validation_dice[budget] < CONVERGENCE_GAIN:
            return budget, None
        budget = doubled
    return None, budget


def labeled_validation_dice(args) -> dict:
    """``{iterations: mean validation Dice}`` of the set's L's of this series and of the work folder's plans (its
    batch size): the rows of ``--results`` and the models kept in the work folder (a GPU machine's results file
    starts empty at each call, its models stay)."""
    models = join(args.work_dir, "models")
    kept = sorted(os.listdir(models)) if os.path.isdir(models) else []
    rows = common.load_rows(args.results) + [load_json(join(models, name, "result.json")) for name in kept
                                             if common.model_done(args.work_dir, name)]
    bench = join(args.work_dir, "acdc_bench.json")
    plans = load_json(bench)["plans"] if isfile(bench) else None
    return {row["iterations"]: row["validation_dice_mean"] for row in rows if row["arm"] == "labeled"
            and row.get("labeled_set") == args.labeled_set and series(row) == args.name_suffix
            and row.get("plans", plans) == plans}


def search_converged_labeled(args, base: list) -> int:
    """Train L at doubling budgets from ``--search-start`` until the reading rule (converged_budget) finds the
    converged one, one budget at a time (``--jobs 1``: each only when the rule needs it) or every budget up to
    ``--search-max`` at once (``--jobs`` > 1, a GPU); the converged budget, or SystemExit if ``--search-max`` is
    reached first."""
    while True:
        dice = labeled_validation_dice(args)
        trail = ", ".join(f"{b} it {dice[b]:.4f}" for b in sorted(dice) if b >= args.search_start)
        converged, next_budget = converged_budget(dice, args.search_start)
        if converged:
            print(f"L of {args.labeled_set}: {trail}; converged at {converged} iterations (its doubling gains less "
                  f"than {CONVERGENCE_GAIN})", flush=True)
            return converged
        trail = trail or "none trained yet"
        if next_budget > args.search_max:
            raise SystemExit(f"L of {args.labeled_set}: {trail}; not converged by --search-max {args.search_max}")
        budgets = [next_budget]
        while args.jobs > 1 and budgets[-1] * 2 <= args.search_max:
            budgets.append(budgets[-1] * 2)
        jobs = [job for job in (_labeled_job(args, base, b) for b in budgets)
                if not common.model_done(args.work_dir, job[0])]
        print(f"L of {args.labeled_set}: {trail}; not converged: training {', '.join(n for n, _ in jobs)}", flush=True)
        if args.dry_run:
            common.run_jobs(jobs, len(jobs), args.work_dir, dry_run=True)
            raise SystemExit(0)
        failed = common.run_jobs(jobs, len(jobs), args.work_dir)
        if failed:
            raise SystemExit(f"L failed: see {join(args.work_dir, failed[0])}.out and .log")


def _labeled_job(args, base: list, iterations: int) -> tuple:
    return (run_name("labeled", args.labeled_set, iterations, suffix=args.name_suffix),
            base + ["--arm", "labeled", "--iterations", str(iterations)])


def iterations_or_converged(text: str):
    """``--from-iterations``: a number of iterations or ``converged``."""
    if text == "converged" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: a number of iterations or 'converged'")


def protocol(args):
    """One labeled set: L (trained first if missing; ``--from-iterations converged``: the budget search), then (a),
    (b), (c), then (d) and (e) at L's + (a)'s iterations, up to ``--jobs`` at once (each a ``run`` subprocess, its
    output in ``<work>/<run>.out``); finished runs are skipped, a stopped one resumes."""
    base = [sys.executable, os.path.abspath(__file__), "run", "-w", args.work_dir, "--labeled-set", args.labeled_set,
            "--device", args.device, "--results", args.results, "--predictions", args.predictions,
            "--iterations-per-epoch", str(args.iterations_per_epoch), "--name-suffix", args.name_suffix]
    if args.test_images:
        base += ["--test-images", args.test_images]
    if args.from_iterations == "converged":
        args.from_iterations = search_converged_labeled(args, base)
    args.from_iterations = int(args.from_iterations)
    total = args.from_iterations + args.iterations
    planned = [("labeled", args.from_iterations)] + [(arm, args.iterations) for arm in CONTINUE_ARMS
                                                      if arm in args.arms] \
        + [(arm, total) for arm in ("bcp", "ceiling") if arm in args.arms]
    first, rest = [], []
    for arm, iterations in planned:
        name = run_name(arm, args.labeled_set, iterations, args.from_iterations, args.name_suffix)
        if common.model_done(args.work_dir, name):
            print(f"{name}: done before (its model is in {join(args.work_dir, 'models')})", flush=True)
            continue
        job = (name, base + ["--arm", arm, "--iterations", str(iterations), "--from-iterations",
                             str(args.from_iterations)])
        (first if arm == "labeled" else rest).append(job)
    failed = common.run_jobs(first, 1, args.work_dir, dry_run=args.dry_run)
    if failed:
        raise SystemExit(f"L failed: see {join(args.work_dir, failed[0])}.out and .log")
    failed = common.run_jobs(rest, args.jobs, args.work_dir, dry_run=args.dry_run)
    if failed:
        raise SystemExit(f"failed: {failed} (see <run>.out and <run>.log in {args.work_dir})")


# ------------------------------------------------------------------------------------------------------- tables
def patient(volume: str) -> str:
    """The patient of a volume (``patient012_frame01`` -> ``patient012``): its two frames are not independent, so
    intervals and tests resample patients."""
    return volume.split("_frame")[0]


def volume_means(row: dict, prefix: str = "validation") -> dict:
    """Per validation volume: the mean Dice over RV, MYO and LV. A class absent from both the reference and the
    prediction (Dice NaN in nnU-Net's evaluation) is left out, as nnU-Net's own means leave it out."""
    return {case: float(np.nanmean([m[str(c)]["Dice"] for c in CLASSES])) for case, m in
            row[f"{prefix}_per_case"].items()}


ARM_LABELS = {"labeled": "L", "labeled_continue": "(a) L continued as nnU-Net",
              "bcp_continue": "(b) BCP from L, plugin defaults",
              "pseudo_continue": "(c) L continued on labels + L's pseudo-labels",
              "bcp": "(d) `-tr nnUNetTrainerBCP` from scratch", "ceiling": "(e) nnU-Net, all 70 patients labeled"}


def series(row: dict) -> str:
    """The suffix a run was named with (``--name-suffix``, e.g. ``_gpu``), '' for none: two runs of one arm and
    labeled set are told apart by it in the tables."""
    plain = run_name(row["arm"], row.get("labeled_set"), row["iterations"], row.get("from_iterations"))
    return row["run"][len(plain):] if row["run"].startswith(plain) else ""


def arm_label(row: dict) -> str:
    suffix = series(row)
    return ARM_LABELS[row["arm"]] + (f" `{suffix}`" if suffix else "")


def iterations_cell(row: dict) -> str:
    """A run's iterations, with those of the L a continuation started from (arms from two Ls share a table)."""
    return f"{row['iterations']}" + (f" (from L's {row['from_iterations']})" if row.get("from_iterations") else "")


def named_if_in_a_series(row: dict) -> str:
    """`` (`<run>`)`` for a run of another series, '' for the main one."""
    return f" (`{row['run']}`)" if series(row) else ""


def total_iterations(row: dict) -> int:
    """A run's iterations with those of the model it continued (L's for a continuation)."""
    return row["iterations"] + (row["from_iterations"] or 0)


def partners(row: dict, candidates: list) -> list:
    """The rows of ``candidates`` to pair ``row`` with: a continuation's of the same start model and iterations; a
    from-scratch run's of the same total iterations on its device, of its own series where that has them (another
    series may have trained on a compact copy from another L) and else of the main one."""
    if row.get("from_checkpoint"):
        return [o for o in candidates if o.get("from_checkpoint") == row["from_checkpoint"]
                and o["iterations"] == row["iterations"]]
    found = [o for o in candidates
             if total_iterations(o) == row["iterations"] and o.get("device") == row.get("device")]
    return [o for o in found if series(o) == series(row)] or [o for o in found if series(o) == ""]


def paired_cells(row: dict, by_arm: dict, prefix: str) -> list:
    """``row`` against (a) and against (c) (see ``partners``): the Dice difference per volume [95% CI, patients
    resampled], better in, and where both have it the HD95 difference."""
    cells = []
    for other in ("labeled_continue", "pseudo_continue"):
        partner = [] if row["arm"] == other else partners(row, by_arm.get(other, []))
        if not partner or f"{prefix}_per_case" not in partner[-1] or f"{prefix}_per_case" not in row:
            cells.append("")
            continue
        stats = common.paired_statistics(volume_means(partner[-1], prefix), volume_means(row, prefix),
                                         cluster=patient)
        cells.append(f"{stats['mean']:+.4f} [{stats['ci'][0]:+.4f}, {stats['ci'][1]:+.4f}], "
                     f"{stats['better']}/{stats['n']}" + hd95_difference(partner[-1], row, prefix))
    return cells


def set_table(labeled_set: str, rows: list) -> str:
    """The arms of one labeled set: the latest row of each run; continuations paired with (a) and (c) of the same L.
    Then, where measured, the same arms once each class keeps only its largest component."""
    latest = {r["run"]: r for r in rows}.values()
    by_arm = {}
    for r in latest:
        by_arm.setdefault(r["arm"], []).append(r)
    def order(r):
        return r.get("from_iterations") or 0, r["iterations"], r["run"]
    ordered = [r for arm in ARMS for r in sorted(by_arm.get(arm, []), key=order)]
    lines = [f"**{labeled_set}** (labeled patients: {', '.join(by_arm.get('labeled', rows)[0]['labeled_patients'])})",
             "", "| arm | iterations | validation Dice mean | RV / MYO / LV | IoU mean | HD95 mean (voxels) | "
             "− (a) per volume [95% CI over patients], better in | − (c) per volume [95% CI over patients] | "
             "train time (s/it) | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        cells = paired_cells(r, by_arm, "validation")
        per_class = " / ".join(f"{r['validation_dice_per_class'][str(c)]:.3f}" for c in CLASSES)
        lines.append(f"| {arm_label(r)} | {iterations_cell(r)} | {r['validation_dice_mean']:.4f} | {per_class} | "
                     f"{r['validation_iou_mean']:.4f} | {hd95_cell(r)} | {cells[0]} | {cells[1]} | "
                     f"{r['train_seconds']} ({r['seconds_per_iteration']}, {r['device']}) | `{r['command']}` |")
    lines += one_command_against_two(by_arm)
    lines += budget_search(by_arm.get("labeled", []))
    kept = [r for r in ordered if f"{LARGEST_COMPONENT}_dice_mean" in r]
    if kept:
        lines += ["", f"{labeled_set}, each class's largest component kept (every arm alike, nothing tuned):", "",
                  "| arm | iterations | Dice mean | RV / MYO / LV | HD95 mean (voxels) | − (a) per volume [95% CI over "
                  "patients], better in | − (c) per volume [95% CI over patients] |", "|---|---|---|---|---|---|---|"]
        for r in kept:
            cells = paired_cells(r, by_arm, LARGEST_COMPONENT)
            per_class = " / ".join(f"{r[f'{LARGEST_COMPONENT}_dice_per_class'][str(c)]:.3f}" for c in CLASSES)
            lines.append(f"| {arm_label(r)} | {iterations_cell(r)} | {r[f'{LARGEST_COMPONENT}_dice_mean']:.4f} | "
                         f"{per_class} | {hd95_cell(r, LARGEST_COMPONENT)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def one_command_against_two(by_arm: dict) -> list:
    """(d) against (b) of the same total iterations (L's and (b)'s), per volume: the one command against the
    two-command recipe it replaces."""
    lines = []
    for d in by_arm.get("bcp", []):
        for b in partners(d, by_arm.get("bcp_continue", [])):
            stats = common.paired_statistics(volume_means(b), volume_means(d), cluster=patient)
            lines += ["", f"(d){named_if_in_a_series(d)} − (b){named_if_in_a_series(b)}, the one command "
                          f"against the two-command recipe at {d['iterations']} iterations in all, per volume: "
                          f"{stats['mean']:+.4f} [{stats['ci'][0]:+.4f}, {stats['ci'][1]:+.4f}], better in "
                          f"{stats['better']}/{stats['n']} (Wilcoxon p over patients = {stats['p']:.2g})"
                          f"{hd95_difference(b, d)}."]
    return lines


def budget_search(labeled: list) -> list:
    """Where L's budget search stands, per series of L runs: each doubling's gain per volume [95% CI over patients],
    and the reading rule's verdict (``converged_budget``): the converged budget, or the next one to train."""
    lines = []
    for suffix in sorted({series(r) for r in labeled}):
        by_budget = {r["iterations"]: r for r in labeled if series(r) == suffix}
        steps = []
        for budget in sorted(by_budget):
            if 2 * budget in by_budget:
                stats = common.paired_statistics(volume_means(by_budget[budget]), volume_means(by_budget[2 * budget]),
                                                 cluster=patient)
                steps.append(f"{budget} → {2 * budget} {stats['mean']:+.4f} [{stats['ci'][0]:+.4f}, "
                             f"{stats['ci'][1]:+.4f}], better in {stats['better']}/{stats['n']}")
        if not steps:
            continue
        converged, next_budget = converged_budget({b: r["validation_dice_mean"] for b, r in by_budget.items()},
                                                  min(by_budget))
        verdict = f"converged at {converged}" if converged else f"not converged, next budget {next_budget}"
        lines += ["", f"L's budget search{f' (`{suffix}`)' if suffix else ''} (budgets double until the doubling "
                      f"gains less than {CONVERGENCE_GAIN} mean validation Dice), per volume: {'; '.join(steps)}: "
                      f"**{verdict}**."]
    return lines


def hd95_cell(row: dict, prefix: str = "validation") -> str:
    """The mean HD95 over the classes, and how many volume-class pairs it leaves out (the class missing from the
    prediction or the reference: on ACDC's validation volumes, a class the model missed)."""
    if row.get(f"{prefix}_hd95_per_class") is None:
        return ""
    undefined = sum(row[f"{prefix}_hd95_undefined"].values())
    if row[f"{prefix}_hd95_mean"] is None:
        return f"undefined ({undefined} volume-classes without it)"
    return f"{row[f'{prefix}_hd95_mean']:.2f}" + (f" ({undefined} volume-classes without it)" if undefined else "")


def volume_hd95(row: dict, prefix: str = "validation") -> dict:
    """Per validation volume where every class is defined: the mean HD95 over RV, MYO and LV."""
    return {case: float(np.mean(list(d.values()))) for case, d in row.get(f"{prefix}_hd95_per_case", {}).items()
            if None not in d.values()}


def hd95_difference(baseline: dict, row: dict, prefix: str = "validation") -> str:
    """``; HD95 <mean> [95% CI], lower in k/n`` per volume (the volumes both define), or '' without HD95."""
    before, after = volume_hd95(baseline, prefix), volume_hd95(row, prefix)
    both = set(before) & set(after)
    if not both:
        return ""
    stats = common.paired_statistics(before, after, cluster=patient)
    lower = sum(after[c] < before[c] for c in both)
    return (f"; HD95 {stats['mean']:+.1f} [{stats['ci'][0]:+.1f}, {stats['ci'][1]:+.1f}], lower in "
            f"{lower}/{stats['n']}")


def is_extra_metric(key: str) -> bool:
    return key.startswith("validation_hd95") or key.startswith(LARGEST_COMPONENT)


def fingerprint(row: dict) -> dict:
    """What tells one training of a run name from another (a retrained run keeps its name)."""
    return {"date": row.get("date"), "validation_dice_mean": row["validation_dice_mean"]}


def with_extra_metrics(rows: list, extra_rows: list) -> list:
    """Rows with the metrics ``add-metrics`` computed afterwards for that training of their run, where they lack
    their own."""
    later = {(r["run"], json.dumps(r["of"])): r for r in extra_rows}
    return [{**{k: v for k, v in later.get((r["run"], json.dumps(fingerprint(r))), {}).items()
                if is_extra_metric(k)}, **r} for r in rows]


def add_metrics(args):
    """``extra_metrics`` of the kept models' final validation predictions, for result rows that lack them: one line
    per run in ``--extra-results``, which ``table`` joins to the rows."""
    done = {(r["run"], json.dumps(r["of"])) for r in common.load_rows(args.extra_results)}
    labels = join(args.work_dir, "nnUNet_raw", DATASET_NAME, "labelsTr")
    for row in {r["run"]: r for r in common.load_rows(args.results)}.values():
        if f"{LARGEST_COMPONENT}_dice_mean" in row or (row["run"], json.dumps(fingerprint(row))) in done:
            continue
        fold = join(args.work_dir, "models", row["run"], "fold_0")
        found = [f for f in os.listdir(join(fold, "validation")) if f.endswith(".nii.gz")] \
            if os.path.isdir(join(fold, "validation")) else []
        if sorted(f[:-len(".nii.gz")] for f in found) != sorted(row["validation_per_case"]):
            print(f"{row['run']}: {join(fold, 'validation')} does not hold the {row['validation_num_cases']} "
                  f"validation label maps its row was scored on ({len(found)} found): skipped", flush=True)
            continue
        metrics = extra_metrics(fold, labels, join(args.work_dir, f"largest_component_{row['run']}"))
        if not metrics:
            raise SystemExit("add-metrics needs MONAI: pip install monai")
        common.append_row(args.extra_results, {"run": row["run"], "of": fingerprint(row), **metrics,
                                               "code": common.code_version()})
        print(f"{row['run']}: HD95 {hd95_cell(metrics)}; largest component kept: Dice "
              f"{metrics[f'{LARGEST_COMPONENT}_dice_mean']:.4f}, HD95 {hd95_cell(metrics, LARGEST_COMPONENT)}",
              flush=True)


def table(args):
    rows = with_extra_metrics(common.load_rows(args.results), common.load_rows(args.extra_results))
    sets = []
    for r in rows:
        if r["labeled_set"] not in sets and r["labeled_set"] is not None:
            sets.append(r["labeled_set"])
    ceiling = [r for r in rows if r["arm"] == "ceiling"]
    parts = [set_table(s, [r for r in rows if r["labeled_set"] == s] + ceiling) for s in sets] or ["No runs yet."]
    text = "\n\n".join(parts)
    doc = open(args.docs).read()
    if TABLE_START not in doc:
        doc += f"\n## ACDC (2d), the BCP paper's benchmark\n\n{TABLE_START}\n{TABLE_END}\n"
    head, rest = doc.split(TABLE_START)
    open(args.docs, "w").write(head + TABLE_START + "\n" + text + "\n" + TABLE_END + rest.split(TABLE_END)[1])
    print(text)


def curve(args):
    """L's (or any kept run's) learning curve: nnU-Net's per-epoch pseudo Dice on 5 validation batches and its moving
    average, from the final checkpoint's log; nnU-Net's progress.png is copied to docs/figures (reduced)."""
    import torch
    fold = join(args.work_dir, "models", args.run, "fold_0")
    log = torch.load(join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)["logging"]
    print("epoch | pseudo Dice (mean over classes) | its moving average (nnU-Net's EMA)")
    for epoch, (dice, ema) in enumerate(zip(log["mean_fg_dice"], log["ema_fg_dice"])):
        if epoch % args.every == 0 or epoch == len(log["mean_fg_dice"]) - 1:
            print(f"{epoch:5d} | {float(dice):.4f} | {float(ema):.4f}")
    maybe_mkdir_p(args.figures)
    figure = join(args.figures, f"acdc_{args.run}_progress.png")
    from PIL import Image
    image = Image.open(join(fold, "progress.png"))
    image.thumbnail((1600, 1600))  # nnU-Net draws 3000 x 5400 pixels: a third of the bytes, still legible
    image.save(figure, optimize=True)
    print(f"copied nnU-Net's progress.png, reduced, to {figure}")


def score(args):
    """Dice per class (and with ``--hd95`` HD95) of every run's committed test predictions against a folder of labels
    (e.g. the held-out test labels, once they are released); nothing else in this benchmark reads test labels."""
    for run in sorted(os.listdir(args.predictions)):
        folder = join(args.predictions, run)
        output = join(args.work_dir, f"test_score_{run}.json")
        maybe_mkdir_p(args.work_dir)
        summary = evaluate_folder(args.labels, folder, output)
        per_class = " ".join(f"{summary['mean'][str(c)]['Dice']:.4f}" for c in CLASSES)
        hd95 = ""
        if args.hd95:
            hd95 = f"; HD95 (voxels) {hd95_cell(hd95_summary(hd95_per_case(folder, args.labels)))}"
        print(f"{run}: mean Dice {summary['foreground_mean']['Dice']:.4f} (RV MYO LV {per_class}){hd95}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--acdc", default=join(HERE, os.pardir, os.pardir, "shared", "data", "ACDC"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--compact", nargs="+", default=None, metavar="FOLDER",
                   help="prepare from compact's folders (training side, test side) instead of --acdc")
    k = sub.add_parser("compact", help="ACDC in at most --max-mb for a machine that gets 64 MiB per call")
    k.add_argument("--acdc", default=join(HERE, os.pardir, os.pardir, "shared", "data", "ACDC"))
    k.add_argument("--out", default=".device/acdc", help="training side [.device/acdc]")
    k.add_argument("--out-test", default=".device/acdc_test", help="test images [.device/acdc_test]")
    k.add_argument("--max-mb", type=float, default=62.0, help="size of the training side, MB [62]")
    k.add_argument("--seed", type=int, default=0, help="order in which unlabeled patients are kept [0]")
    r = sub.add_parser("run")
    r.add_argument("--arm", required=True, choices=ARMS)
    r.add_argument("--labeled-set", default="paper3", help="paper3, paper7, random3_s1, random3_s2 [paper3]")
    r.add_argument("--iterations", type=int, default=1000, help="iterations of this run [1000]")
    r.add_argument("--from-iterations", type=int, default=1000, help="iterations of L, for continuations [1000]")
    o = sub.add_parser("protocol")
    o.add_argument("--labeled-set", default="paper3")
    o.add_argument("--iterations", type=int, default=1000, help="iterations of each continuation [1000]")
    o.add_argument("--from-iterations", default="1000", type=iterations_or_converged,
                   help="iterations of L, or 'converged': L's budget search (doubling from --search-start until "
                        f"the doubling gains less than {CONVERGENCE_GAIN} mean validation Dice) [1000]")
    o.add_argument("--search-start", type=int, default=1000, help="the search's first budget [1000]")
    o.add_argument("--search-max", type=int, default=16000, help="the search's largest budget [16000]")
    o.add_argument("--arms", nargs="+", default=list(ARMS[1:]), choices=ARMS[1:], help="[all]")
    o.add_argument("--jobs", type=int, default=1, help="runs at once after L [1]")
    o.add_argument("--dry-run", action="store_true")
    t = sub.add_parser("table")
    h = sub.add_parser("add-metrics", help="HD95 and the largest-component metrics of kept models' validation "
                                            "predictions, for rows without them")
    t.add_argument("--docs", default=DOCS)
    v = sub.add_parser("curve")
    v.add_argument("--run", required=True, help="a kept run, e.g. labeled_paper3_it1000")
    v.add_argument("--every", type=int, default=5, help="print every N-th epoch [5]")
    v.add_argument("--figures", default=join(HERE, os.pardir, "docs", "figures"), help="[docs/figures]")
    c = sub.add_parser("score")
    c.add_argument("--labels", required=True, help="folder of label maps named like the test images")
    c.add_argument("--hd95", action="store_true", help="HD95 as well (needs MONAI)")
    for q in (p, r, o, c, v, h):
        q.add_argument("-w", "--work-dir", default="bench_acdc")
    for q in (r, o, t, c, h):
        q.add_argument("--results", default=RESULTS)
        q.add_argument("--predictions", default=TEST_PREDICTIONS, help="where the test label maps are copied")
    for q in (t, h):
        q.add_argument("--extra-results", default=EXTRA_RESULTS)
    for q in (r, o):
        q.add_argument("--iterations-per-epoch", type=int, default=common.DEFAULT_ITERATIONS_PER_EPOCH)
        q.add_argument("--device", default="cpu")
        q.add_argument("--test-images", default=None, help="another image folder to predict [ACDC's test images]")
        q.add_argument("--name-suffix", default="", help="added to the run names of another series, e.g. _gpu")
    args = parser.parse_args()
    if hasattr(args, "work_dir"):
        args.work_dir = os.path.abspath(args.work_dir)
    {"prepare": prepare, "compact": compact, "run": run, "protocol": protocol, "table": table, "curve": curve,
     "score": score, "add-metrics": add_metrics}[args.command](args)


if __name__ == "__main__":
    main()
