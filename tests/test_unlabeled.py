"""Unlabeled images: raw validation, preprocessing (equality, staleness, resume), label subsets, the stream."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json, load_pickle, save_json

from conftest import run_cli
from nnunetv2_bcp.unlabeled.label_subset import LABEL_SUBSET_FILE, choose_label_subset, load_label_subset
from nnunetv2_bcp.unlabeled.preprocess import (MANIFEST_FILE, _preprocessed_configurations, collect_unlabeled_sources,
                                               config_fingerprint, preprocess_unlabeled, preprocessed_unlabeled_cases,
                                               unlabeled_cases_for_training, unlabeled_data_folder)
from nnunetv2_bcp.unlabeled.raw import UnlabeledDataError


def _inputs(ds):
    plans = load_json(join(ds["preprocessed"], "nnUNetPlans.json"))
    return plans, load_json(join(ds["preprocessed"], "dataset.json"))


@pytest.fixture
def dataset_copy(synthetic_3d, tmp_path):
    """A private copy of the raw + preprocessed synthetic dataset, so tests can break things."""
    raw = str(tmp_path / "raw")
    pre = str(tmp_path / "pre")
    shutil.copytree(synthetic_3d["raw"], raw)
    shutil.copytree(synthetic_3d["preprocessed"], pre)
    plans, dataset_json = _inputs(synthetic_3d)
    return {"raw": raw, "preprocessed": pre, "plans": plans, "dataset_json": dataset_json}


def _run(ds, num_processes=1):
    return preprocess_unlabeled(ds["plans"], "3d_fullres", ds["dataset_json"], ds["raw"], ds["preprocessed"],
                                num_processes=num_processes, verbose=False)


def test_unlabeled_case_equals_nnunet_preprocessing(dataset_copy):
    ds = dataset_copy
    # the image of a labeled training case, given as unlabeled: its data must equal nnU-Net's own preprocessing
    shutil.copy(join(ds["raw"], "imagesTr", "case_000_0000.nii.gz"),
                join(ds["raw"], "imagesUnlabeled", "copy_000_0000.nii.gz"))
    folder = _run(ds, num_processes=2)
    assert folder == join(ds["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled")
    ours = blosc2.open(join(folder, "copy_000.b2nd"), mode="r")[:]
    nnunet = blosc2.open(join(ds["preprocessed"], "nnUNetPlans_3d_fullres", "case_000.b2nd"), mode="r")[:]
    assert ours.dtype == np.float32 and ours.shape == nnunet.shape
    np.testing.assert_array_equal(ours, nnunet)
    seg = blosc2.open(join(folder, "copy_000_seg.b2nd"), mode="r")[:]
    assert set(np.unique(seg)) <= {-1, 0}  # only the nonzero mask, no label
    props = load_pickle(join(folder, "copy_000.pkl"))
    nn_props = load_pickle(join(ds["preprocessed"], "nnUNetPlans_3d_fullres", "case_000.pkl"))
    assert props["bbox_used_for_cropping"] == nn_props["bbox_used_for_cropping"]
    assert all(len(v) == 0 for v in props["class_locations"].values())
    assert set(props["class_locations"]) == set(nn_props["class_locations"])
    # every unlabeled case is there; nothing was written into nnU-Net's own folder
    assert sorted(load_json(join(folder, MANIFEST_FILE))["cases"]) == ["copy_000"] + [f"unl_{i:03d}" for i in range(4)]
    assert not any(f.startswith("unl_") for f in os.listdir(join(ds["preprocessed"], "nnUNetPlans_3d_fullres")))


def test_up_to_date_data_is_kept_and_stale_data_redone(dataset_copy):
    ds = dataset_copy
    folder = _run(ds)
    mtimes = {f: os.stat(join(folder, f)).st_mtime_ns for f in os.listdir(folder) if f.endswith(".b2nd")}
    _run(ds)  # nothing to do
    assert mtimes == {f: os.stat(join(folder, f)).st_mtime_ns for f in mtimes}
    # an edited image: only that case is redone
    image_path = join(ds["raw"], "imagesUnlabeled", "unl_001_0000.nii.gz")
    image = sitk.ReadImage(image_path)
    sitk.WriteImage(image * 2.0, image_path)
    _run(ds)
    changed = {f for f in mtimes if os.stat(join(folder, f)).st_mtime_ns != mtimes[f]}
    assert changed == {"unl_001.b2nd", "unl_001_seg.b2nd"}
    # changed plans (another normalisation): everything is redone, with the new plans
    before = blosc2.open(join(folder, "unl_000.b2nd"), mode="r")[:]
    ds["plans"]["configurations"]["3d_fullres"]["normalization_schemes"] = ["NoNormalization"]
    _run(ds)
    after = blosc2.open(join(folder, "unl_000.b2nd"), mode="r")[:]
    assert not np.allclose(before, after) and after.max() > 50  # raw intensities now
    # a removed unlabeled image disappears from the preprocessed data as well
    os.remove(image_path)
    _run(ds)
    assert not os.path.exists(join(folder, "unl_001.b2nd"))
    assert "unl_001" not in load_json(join(folder, MANIFEST_FILE))["cases"]


def test_configurations_sharing_their_data_share_the_unlabeled_data(dataset_copy):
    """A configuration that inherits another's preprocessing (nnU-Net's usual custom configurations, the cascade's
    full resolution) shares its data folder: each one's training keeps the other's unlabeled data, and the command
    without -c preprocesses the folder once."""
    ds = dataset_copy
    ds["plans"]["configurations"]["3d_fullres_bs4"] = {"inherits_from": "3d_fullres", "batch_size": 4}
    plans_file = join(ds["preprocessed"], "nnUNetPlans_shared.json")
    save_json(ds["plans"], plans_file)
    folder = _run(ds)
    mtimes = {f: os.stat(join(folder, f)).st_mtime_ns for f in os.listdir(folder) if f.endswith(".b2nd")}
    assert preprocess_unlabeled(ds["plans"], "3d_fullres_bs4", ds["dataset_json"], ds["raw"], ds["preprocessed"],
                                num_processes=1, verbose=False) == folder
    _run(ds)
    assert mtimes == {f: os.stat(join(folder, f)).st_mtime_ns for f in mtimes}
    assert _preprocessed_configurations(plans_file) == ["3d_fullres"]
    # a manifest that holds the fingerprint of the whole configuration (it covers the preprocessing entries) is kept
    manifest = load_json(join(folder, MANIFEST_FILE))
    manifest["fingerprint"] = config_fingerprint(ds["plans"], "3d_fullres", ds["dataset_json"], entries=None)
    save_json(manifest, join(folder, MANIFEST_FILE))
    assert preprocessed_unlabeled_cases(ds["plans"], "3d_fullres", ds["dataset_json"], ds["preprocessed"])[1] == \
        sorted(manifest["cases"])
    _run(ds)
    assert mtimes == {f: os.stat(join(folder, f)).st_mtime_ns for f in mtimes}
    assert load_json(join(folder, MANIFEST_FILE))["fingerprint"] == \
        config_fingerprint(ds["plans"], "3d_fullres", ds["dataset_json"])


def test_interrupted_run_resumes(dataset_copy):
    ds = dataset_copy
    folder = _run(ds)
    # simulate a kill: one case never finished (not in the manifest, files partly there), a stale temp folder
    manifest = load_json(join(folder, MANIFEST_FILE))
    del manifest["cases"]["unl_002"]
    save_json(manifest, join(folder, MANIFEST_FILE))
    os.remove(join(folder, "unl_002.pkl"))
    os.makedirs(join(folder, ".tmp_unl_003_12345"))
    mtime_other = os.stat(join(folder, "unl_000.b2nd")).st_mtime_ns
    _run(ds)
    assert os.path.isfile(join(folder, "unl_002.pkl")) and "unl_002" in load_json(join(folder, MANIFEST_FILE))["cases"]
    assert os.stat(join(folder, "unl_000.b2nd")).st_mtime_ns == mtime_other
    assert not any(f.startswith(".tmp_") for f in os.listdir(folder))


def _write_image(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, path)


BAD_INPUTS = {
    "missing channel": (lambda d: os.rename(join(d, "unl_000_0000.nii.gz"), join(d, "unl_000_0001.nii.gz")),
                        "unl_000_0000.nii.gz: missing"),
    "wrong ending": (lambda d: shutil.copy(join(d, "unl_000_0000.nii.gz"), join(d, "unl_009_0000.nii")),
                     "unl_009_0000.nii: wrong file ending"),
    "bad name": (lambda d: shutil.copy(join(d, "unl_000_0000.nii.gz"), join(d, "scan.nii.gz")),
                 "scan.nii.gz: name must be CASE_XXXX.nii.gz"),
    "unreadable": (lambda d: open(join(d, "unl_001_0000.nii.gz"), "wb").write(b"not an image at all"),
                   "unl_001_0000.nii.gz: unreadable image"),
    "corrupt gzip": (lambda d: open(join(d, "unl_001_0000.nii.gz"), "r+b").write(b"\x1f\x8b\x08\x00garbage"),
                     "unl_001_0000.nii.gz: unreadable image"),
    "truncated": (lambda d: open(join(d, "unl_001_0000.nii.gz"), "r+b").truncate(
        os.path.getsize(join(d, "unl_001_0000.nii.gz")) // 2), "unl_001_0000.nii.gz: truncated or corrupt file"),
    "2d image": (lambda d: _write_image(join(d, "unl_002_0000.nii.gz"), np.zeros((32, 32), np.float32), (1.0, 1.0)),
                 "unl_002_0000.nii.gz: 2D image, but the training images (imagesTr) are 3D"),
    "nan": (lambda d: _write_image(join(d, "unl_003_0000.nii.gz"),
                                   np.where(np.eye(32)[None].repeat(32, 0) > 0, np.nan, 1.0).astype(np.float32)),
            "unl_003_0000.nii.gz: contains NaN or infinite voxels"),
    "name clash": (lambda d: shutil.copy(join(d, "unl_000_0000.nii.gz"), join(d, "case_001_0000.nii.gz")),
                   "case 'case_001' also exists in imagesTr"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_unlabeled_input_fails_with_the_file_named(dataset_copy, kind):
    ds = dataset_copy
    damage, message = BAD_INPUTS[kind]
    damage(join(ds["raw"], "imagesUnlabeled"))
    with pytest.raises(UnlabeledDataError) as info:
        _run(ds, num_processes=2 if kind in ("nan", "truncated") else 1)
    assert message in str(info.value)
    assert join(ds["raw"], "imagesUnlabeled") in str(info.value)


def test_channel_geometry_mismatch_is_reported(dataset_copy, tmp_path):
    ds = dataset_copy
    ds["dataset_json"]["channel_names"] = {"0": "T1", "1": "T2"}
    folder = join(ds["raw"], "imagesUnlabeled")
    for f in os.listdir(folder):
        shutil.copy(join(folder, f), join(folder, f.replace("_0000", "_0001")))
    _write_image(join(folder, "unl_000_0001.nii.gz"), np.zeros((32, 32, 32), np.float32), (2.0, 1.0, 1.0))
    with pytest.raises(UnlabeledDataError, match=r"unl_000_0001.nii.gz: spacing .* differs from channel 0"):
        collect_unlabeled_sources(ds["raw"], ds["dataset_json"])


def test_label_subset_choice_is_seeded_and_checked():
    ids = [f"c{i:02d}" for i in range(20)]
    splits = [{"train": ids[:16], "val": ids[16:]}]
    a = choose_label_subset(ids, splits, num_labeled=3, seed=1)
    b = choose_label_subset(ids, splits, num_labeled=3, seed=1)
    c = choose_label_subset(ids, splits, num_labeled=3, seed=2)
    assert a == b and a != c
    fold = a["folds"]["0"]
    assert len(fold["labeled"]) == 3 and set(fold["labeled"]) <= set(ids[:16])
    assert sorted(fold["labeled"] + fold["unlabeled"]) == ids[:16]  # validation cases stay out of it
    assert len(a["folds"]["all"]["labeled"]) == 3 and len(a["folds"]["all"]["unlabeled"]) == 17
    with pytest.raises(UnlabeledDataError, match="asked for 17 labeled cases but fold 0 has 16"):
        choose_label_subset(ids, splits, num_labeled=17)
    with pytest.raises(UnlabeledDataError, match="not training cases of this dataset: \\['nope'\\]"):
        choose_label_subset(ids, splits, labeled_cases=["c01", "nope"])


def test_label_subset_command_and_dropped_labels_never_opened(dataset_copy, monkeypatch):
    ds = dataset_copy
    # run the console command on the shared synthetic dataset, then look at what it wrote
    pre_root = os.environ["nnUNet_preprocessed"]
    result = run_cli("nnUNetv2_bcp_label_subset", "-d", "990", "-k", "2", "--seed", "3")
    assert "fold 0: 2 labeled" in result.stdout
    subset_file = join(pre_root, "Dataset990_BCPSynthetic", LABEL_SUBSET_FILE)
    subset = load_json(subset_file)
    splits = load_json(join(pre_root, "Dataset990_BCPSynthetic", "splits_final.json"))
    assert sorted(subset["folds"]["0"]["labeled"] + subset["folds"]["0"]["unlabeled"]) == sorted(splits[0]["train"])
    run_cli("nnUNetv2_bcp_label_subset", "-d", "990", "--remove")
    assert not os.path.exists(subset_file)
    # in the private copy: a subset whose dropped cases have destroyed labels (raw and preprocessed)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_bcp.unlabeled import loader
    shutil.copy(join(pre_root, "Dataset990_BCPSynthetic", "splits_final.json"), ds["preprocessed"])
    ids = [f"case_{i:03d}" for i in range(6)]
    subset = choose_label_subset(ids, splits, num_labeled=2, seed=3)
    save_json(subset, join(ds["preprocessed"], LABEL_SUBSET_FILE))
    dropped = subset["folds"]["0"]["unlabeled"]
    nnunet_folder = join(ds["preprocessed"], "nnUNetPlans_3d_fullres")
    images = {c: blosc2.open(join(nnunet_folder, c + ".b2nd"), mode="r")[:] for c in dropped}
    for case in {c for f in subset["folds"].values() for c in f["unlabeled"]}:
        with open(join(ds["raw"], "labelsTr", case + ".nii.gz"), "wb") as f:
            f.write(b"destroyed")
        os.remove(join(nnunet_folder, case + "_seg.b2nd"))
        with open(join(nnunet_folder, case + ".pkl"), "wb") as f:  # holds the label's class_locations
            f.write(b"destroyed")
    # preprocessing makes no second copy of them: only imagesUnlabeled is preprocessed
    folder = _run(ds)
    assert sorted(load_json(join(folder, MANIFEST_FILE))["cases"]) == [f"unl_{i:03d}" for i in range(4)]
    assert load_label_subset(ds["preprocessed"], ids)["folds"]["0"]["unlabeled"] == dropped
    # the stream's dataset reads their images in place and opens nothing else of them
    opened = []
    for module, name in ((loader.blosc2, "open"), (loader.np, "load")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: opened.append(k.get("urlpath", a[0] if a
                                                                                        else None)) or _real(*a, **k))
    monkeypatch.setattr(loader, "load_pickle", lambda path: opened.append(path) or load_pickle(path), raising=False)
    pm = PlansManager(ds["plans"])
    dataset = loader.UnlabeledDataset(folder, ["unl_000"], nnunet_folder, dropped,
                                      pm.get_label_manager(ds["dataset_json"]), [False])
    assert dataset.identifiers == sorted(["unl_000"] + dropped)
    for case in dropped:
        data, seg, seg_prev, properties = dataset.load_case(case)
        np.testing.assert_array_equal(data[:], images[case])
        assert seg.shape == (1, *images[case].shape[1:]) and seg_prev is None
        assert not seg[(slice(None), slice(0, 5), slice(2, 9), slice(None))].any()  # no mask-normalised channel
        assert all(len(v) == 0 for v in properties["class_locations"].values())
    assert opened and all(p == join(nnunet_folder, c + ".b2nd") for p, c in zip(opened, dropped))
    # through nnU-Net's loader and augmentation: batches of the label-dropped cases, no label touched
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    cm = pm.get_configuration("3d_fullres")
    transforms = nnUNetTrainer.get_training_transforms(cm.patch_size, (-0.5, 0.5), None, (0, 1, 2), False)
    dropped_only = loader.UnlabeledDataset(folder, [], nnunet_folder, dropped, pm.get_label_manager(ds["dataset_json"]))
    batch = next(loader.make_unlabeled_stream(dropped_only, 4, cm.patch_size, cm.patch_size,
                                              pm.get_label_manager(ds["dataset_json"]), transforms, num_processes=0))
    assert set(batch["keys"]) <= set(dropped) and torch.isfinite(batch["data"]).all()
    assert not any("_seg" in str(p) or str(p).endswith(".pkl") for p in opened)


def test_nonzero_mask_of_image_matches_nnunet_preprocessing():
    """For label-dropped cases the seg channel is made from nnU-Net's image: -1 where every channel normalised
    within the nonzero mask is 0, which is where nnU-Net's preprocessing writes -1 (no resampling here)."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    from nnunetv2_bcp.unlabeled.loader import NonzeroMaskOfImage
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:20, :30, :26]
    inside = ((z - 10) / 9) ** 2 + ((y - 15) / 13) ** 2 + ((x - 12) / 11) ** 2 < 1
    image = np.stack([np.where(inside, rng.normal(5, 1, inside.shape), 0),     # normalised within the mask
                      np.where(inside, rng.normal(100, 9, inside.shape), 0)])  # normalised everywhere
    data, seg, _ = crop_to_nonzero(image.astype(np.float32), None)
    data[0] = ZScoreNormalization(use_mask_for_norm=True, intensityproperties={}).run(data[0], seg[0])
    data[1] = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(data[1], seg[0])
    assert (seg < 0).any() and (seg == 0).any()
    mask = NonzeroMaskOfImage(data, [0])
    assert mask.shape == seg.shape
    np.testing.assert_array_equal(mask[(slice(None), slice(None), slice(None), slice(None))], seg)
    window = (slice(None), slice(2, 9), slice(0, 30), slice(5, 6))
    np.testing.assert_array_equal(mask[window], seg[window])
    without = NonzeroMaskOfImage(data, [])[window]  # no channel normalised within the mask: nothing to mask
    assert without.shape == seg[window].shape and not without.any()


def test_label_subset_file_naming_unknown_cases_is_refused(dataset_copy):
    ds = dataset_copy
    save_json({"folds": {"0": {"labeled": ["case_000", "ghost_1"], "unlabeled": []}}},
              join(ds["preprocessed"], LABEL_SUBSET_FILE))
    with pytest.raises(UnlabeledDataError, match="fold 0 names cases that are not training cases.*ghost_1"):
        load_label_subset(ds["preprocessed"], [f"case_{i:03d}" for i in range(6)])


def test_stream_yields_augmented_batches(dataset_copy):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_bcp.unlabeled.loader import make_unlabeled_stream, shutdown_stream, unlabeled_augmentation_workers
    ds = dataset_copy
    # an unlabeled image smaller than the patch is padded, as nnU-Net pads small training images
    _write_image(join(ds["raw"], "imagesUnlabeled", "small_000_0000.nii.gz"),
                 np.random.default_rng(0).random((10, 12, 14)).astype(np.float32))
    folder = _run(ds)
    pm = PlansManager(ds["plans"])
    cm = pm.get_configuration("3d_fullres")
    lm = pm.get_label_manager(ds["dataset_json"])
    scales = list(list(i) for i in 1 / np.cumprod(np.vstack(cm.pool_op_kernel_sizes), axis=0))[:-1]
    transforms = nnUNetTrainer.get_training_transforms(cm.patch_size, (-0.5, 0.5), scales, (0, 1, 2), False)
    dataset = nnUNetDatasetBlosc2(folder)
    assert sorted(dataset.identifiers) == ["small_000"] + [f"unl_{i:03d}" for i in range(4)]
    for workers in (0, 1):
        stream = make_unlabeled_stream(dataset, 6, [40, 40, 40], cm.patch_size, lm, transforms, num_processes=workers)
        try:
            for _ in range(2):
                batch = next(stream)
                assert batch["data"].shape == (6, 1, *cm.patch_size) and batch["data"].dtype == torch.float32
                assert len(batch["target"]) == len(scales)
                assert all(set(k).issubset(dataset.identifiers) for k in [batch["keys"]])
                assert torch.isfinite(batch["data"]).all() and batch["data"].std() > 0.1
        finally:
            shutdown_stream(stream)
    small = make_unlabeled_stream(nnUNetDatasetBlosc2(folder, ["small_000"]), 2, [40, 40, 40], cm.patch_size, lm,
                                  transforms, num_processes=0)
    assert next(small)["data"].shape == (2, 1, *cm.patch_size)  # smaller than the patch: padded
    assert [unlabeled_augmentation_workers(n) for n in (0, 1, 2, 5, 12)] == [0, 1, 1, 2, 6]


def test_console_command_preprocesses_and_rejects_bad_dataset(synthetic_3d):
    result = run_cli("nnUNetv2_bcp_preprocess_unlabeled", "-d", "990", "-np", "2")
    folder = unlabeled_data_folder(synthetic_3d["preprocessed"], "nnUNetPlans_3d_fullres")
    assert "Unlabeled data for 3d_fullres" in result.stdout and "Unlabeled data for 2d" not in result.stdout
    assert len(load_json(join(folder, MANIFEST_FILE))["cases"]) == 4
    bad = run_cli("nnUNetv2_bcp_preprocess_unlabeled", "-d", "990", "-c", "3d_lowres", check=False)
    assert bad.returncode != 0 and "has no configuration ['3d_lowres']" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_preprocessing_killed_midway_finishes_cleanly(synthetic_3d, tmp_path):
    roots = {name: str(tmp_path / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw = join(roots["nnUNet_raw"], "Dataset990_BCPSynthetic")
    shutil.copytree(synthetic_3d["raw"], raw)
    # without the session's unlabeled data: its manifest (possibly written with other plans by another test) would
    # count as progress of the run killed below before that run had done anything
    shutil.copytree(synthetic_3d["preprocessed"], join(roots["nnUNet_preprocessed"], "Dataset990_BCPSynthetic"),
                    ignore=shutil.ignore_patterns("*_unlabeled"))
    total = 40  # enough that the kill, at the first finished case, comes with most of them still to do
    for i in range(4, total):
        shutil.copy(join(raw, "imagesUnlabeled", f"unl_{i % 4:03d}_0000.nii.gz"),
                    join(raw, "imagesUnlabeled", f"unl_{i:03d}_0000.nii.gz"))
    env = dict(os.environ, **roots)
    cmd = [os.path.join(os.path.dirname(sys.executable), "nnUNetv2_bcp_preprocess_unlabeled"), "-d", "990",
           "-c", "3d_fullres", "-np", "2"]
    folder = join(roots["nnUNet_preprocessed"], "Dataset990_BCPSynthetic", "nnUNetPlans_3d_fullres_unlabeled")
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    started_cases, running_at_kill = False, False
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not started_cases:
            manifest = join(folder, MANIFEST_FILE)
            started_cases = os.path.isfile(manifest) and len(load_json(manifest)["cases"]) >= 1
            time.sleep(0.01)
        running_at_kill = process.poll() is None
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done_before = len(load_json(join(folder, MANIFEST_FILE))["cases"])
    # the kill came mid-way: some cases done, the others not, and not because the deadline ran out
    assert started_cases and running_at_kill and 0 < done_before < total, (started_cases, running_at_kill,
                                                                            done_before)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{done_before} of {total} cases up to date" in result.stdout
    cases = load_json(join(folder, MANIFEST_FILE))["cases"]
    assert len(cases) == total and not [f for f in os.listdir(folder) if f.startswith(".tmp_")]
    for case in cases:  # every case complete and readable
        assert blosc2.open(join(folder, case + ".b2nd"), mode="r")[:].shape[0] == 1
        assert load_pickle(join(folder, case + ".pkl"))["class_locations"] is not None


@pytest.fixture
def preprocessed_only(synthetic_3d, tmp_path, monkeypatch):
    """nnU-Net's folders as on a cluster node: nnUNet_preprocessed (with the unlabeled cases preprocessed), no
    nnUNet_raw."""
    pre = join(str(tmp_path / "nnUNet_preprocessed"), "Dataset990_BCPSynthetic")
    shutil.copytree(synthetic_3d["preprocessed"], pre)
    plans, dataset_json = _inputs(synthetic_3d)
    preprocess_unlabeled(plans, "3d_fullres", dataset_json, synthetic_3d["raw"], pre, num_processes=1, verbose=False)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    monkeypatch.delenv("nnUNet_raw")
    return {"preprocessed": pre, "plans": plans, "dataset_json": dataset_json}


def _trainer(ds):
    from nnunetv2_bcp import nnUNetTrainerBCP
    trainer = nnUNetTrainerBCP(dict(ds["plans"], continue_training=False), "3d_fullres", 0, ds["dataset_json"],
                               torch.device("cpu"))
    trainer.initialize()
    log = []
    trainer.print_to_log_file = lambda *args, **kwargs: log.append(" ".join(str(a) for a in args))
    return trainer, log


def test_training_without_nnunet_raw_uses_the_manifest(preprocessed_only, monkeypatch):
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    from nnunetv2_bcp.unlabeled import preprocess
    from nnunetv2_bcp.unlabeled.loader import shutdown_stream
    ds = preprocessed_only
    monkeypatch.setattr(preprocess, "preprocess_unlabeled", lambda *a, **k: pytest.fail("needs nnUNet_raw"))
    # nnU-Net's labeled loaders get nnU-Net's whole worker budget (stage 1 runs as nnU-Net does)
    workers_seen = []
    monkeypatch.setattr(nnUNetTrainer, "get_dataloaders",
                        lambda self: workers_seen.append(get_allowed_n_proc_DA()) or (None, None))
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")  # nnU-Net caps it at the CPU count: keep within 2 CPUs
    trainer, log = _trainer(ds)
    trainer.get_dataloaders()
    stream = trainer.dataloader_unlabeled
    try:
        assert workers_seen == [2]
        # the unlabeled stream has half of it, and its workers are not started before its first (stage-2) batch
        assert isinstance(stream, NonDetMultiThreadedAugmenter) and stream.num_processes == 1
        assert not stream.initialized and not stream._processes
        assert any("not found: training with the 4 unlabeled cases preprocessed in" in line for line in log)
        assert any("BCP unlabeled stream: 4 cases" in line for line in log)
        batch = next(stream)
        assert set(batch["keys"]) <= {f"unl_{i:03d}" for i in range(4)}
        # no deep-supervision targets: one tensor (the nonzero mask after augmentation), not one per scale
        assert isinstance(batch["target"], torch.Tensor)
        assert batch["target"].shape == (trainer.batch_size, 1, *trainer.configuration_manager.patch_size)
    finally:
        shutdown_stream(stream)
    # data made with other plans cannot be redone without the raw images: refused, naming the reason
    trainer.plans_manager.plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["NoNormalization"]
    with pytest.raises(SystemExit, match="preprocessed with other plans.*raw images are not here"):
        trainer.get_dataloaders()
    # neither raw images nor a manifest: today's message
    shutil.rmtree(join(ds["preprocessed"], "nnUNetPlans_3d_fullres_unlabeled"))
    with pytest.raises(SystemExit, match="needs unlabeled images and found none.*nnUNet_raw is not set"):
        trainer.get_dataloaders()


def test_raw_folder_without_unlabeled_images_uses_the_manifest(dataset_copy):
    ds = dataset_copy
    folder = _run(ds)
    shutil.rmtree(join(ds["raw"], "imagesUnlabeled"))  # e.g. only imagesTr/labelsTr copied to this node
    log = []
    found = unlabeled_cases_for_training(ds["plans"], "3d_fullres", ds["dataset_json"], ds["raw"],
                                         ds["preprocessed"], log=log.append)
    assert found == (folder, [f"unl_{i:03d}" for i in range(4)])
    assert len(log) == 1 and join(ds["raw"], "imagesUnlabeled") + " not found" in log[0]
    os.remove(join(folder, "unl_002.pkl"))
    with pytest.raises(UnlabeledDataError, match="unl_002: files missing"):
        unlabeled_cases_for_training(ds["plans"], "3d_fullres", ds["dataset_json"], ds["raw"], ds["preprocessed"])


def _initialized_trainer(trainer_class, ds):
    """A trainer of fold 0 of the private dataset copy, initialised (nothing trained)."""
    t = trainer_class(dict(ds["plans"], continue_training=False), "3d_fullres", 0, ds["dataset_json"],
                      torch.device("cpu"))
    t.preprocessed_dataset_folder_base = ds["preprocessed"]
    t.preprocessed_dataset_folder = join(ds["preprocessed"], "nnUNetPlans_3d_fullres")
    t.initialize()
    return t


def _label_subset_trainer_class(name):
    from nnunetv2_bcp.training.nnUNetTrainerLabelSubset import nnUNetTrainerLabelSubset
    from nnunetv2_bcp.training.variant_label_subset import nnUNetTrainerBCP_labelSubset
    return {c.__name__: c for c in (nnUNetTrainerLabelSubset, nnUNetTrainerBCP_labelSubset)}[name]


def test_a_label_subset_is_used_only_by_trainers_that_opt_in_said_at_the_start_and_recorded(dataset_copy):
    """A subset file left in the preprocessed folder must not turn later trainings into label-scarce ones: only the
    trainers named for it use it (each start says so in the log, and BCP records it in bcp_settings.json and its
    checkpoints); nnUNetTrainerBCP trains on every label and says it leaves the file unused."""
    from nnunetv2_bcp import nnUNetTrainerBCP
    from nnunetv2_bcp.training.variant_label_subset import nnUNetTrainerBCP_labelSubset
    ds = dataset_copy
    ids = [f"case_{i:03d}" for i in range(6)]
    splits = [{"train": ids[:5], "val": ids[5:]}]
    save_json(splits, join(ds["preprocessed"], "splits_final.json"))
    subset = choose_label_subset(ids, splits, num_labeled=2, seed=1)
    save_json(subset, join(ds["preprocessed"], LABEL_SUBSET_FILE))

    every_label = _initialized_trainer(nnUNetTrainerBCP, ds)
    training, _ = every_label.get_tr_and_val_datasets()
    assert sorted(training.identifiers) == ids[:5] and every_label.bcp_settings()["label_subset"] is None
    assert every_label._label_subset_of_fold() is None  # no label-dropped cases in its unlabeled stream either
    assert "leaves the label subset" in open(every_label.log_file).read()
    trainer = _initialized_trainer(nnUNetTrainerBCP_labelSubset, ds)
    training, _ = trainer.get_tr_and_val_datasets()
    assert sorted(training.identifiers) == subset["folds"]["0"]["labeled"]
    recorded = trainer.bcp_settings()["label_subset"]
    assert recorded == {"file": join(ds["preprocessed"], LABEL_SUBSET_FILE), "fold": "0",
                        "labeled": subset["folds"]["0"]["labeled"],
                        "num_label_dropped": len(subset["folds"]["0"]["unlabeled"])}
    assert trainer.bcp_state()["settings"]["label_subset"] == recorded
    log = open(trainer.log_file).read()
    assert "WARNING: label subset in effect" in log
    assert "nnUNetv2_bcp_label_subset -d Dataset990_BCPSynthetic --remove" in log


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerLabelSubset", "nnUNetTrainerBCP_labelSubset"])
def test_a_run_resumed_after_its_label_subset_changed_is_refused(dataset_copy, trainer_name):
    """The checkpoints record the subset a run trains on: resumed (--c) after the file changed, the run would go on
    with other labeled cases; it stops instead, naming both."""
    trainer_class = _label_subset_trainer_class(trainer_name)
    ds = dataset_copy
    ids = [f"case_{i:03d}" for i in range(6)]
    splits = [{"train": ids[:5], "val": ids[5:]}]
    save_json(splits, join(ds["preprocessed"], "splits_final.json"))
    path = join(ds["preprocessed"], LABEL_SUBSET_FILE)
    save_json(choose_label_subset(ids, splits, labeled_cases=ids[:2]), path)

    trainer = _initialized_trainer(trainer_class, ds)
    trainer.get_tr_and_val_datasets()
    checkpoint = join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(checkpoint)
    resumed = _initialized_trainer(trainer_class, ds)
    resumed.load_checkpoint(checkpoint)
    assert sorted(resumed.get_tr_and_val_datasets()[0].identifiers) == ids[:2]  # the same file: it goes on
    save_json(choose_label_subset(ids, splits, labeled_cases=ids[2:4]), path)
    resumed = _initialized_trainer(trainer_class, ds)
    resumed.load_checkpoint(checkpoint)
    with pytest.raises(SystemExit, match=re.escape(f"{LABEL_SUBSET_FILE}: this run started with the labeled cases "
                                                   f"{ids[:2]} (3 label-dropped) and the file now names {ids[2:4]}")):
        resumed.get_tr_and_val_datasets()


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerLabelSubset", "nnUNetTrainerBCP_labelSubset"])
def test_a_trainer_named_for_a_label_subset_refuses_a_missing_or_wrong_one_naming_the_file(dataset_copy, trainer_name):
    """Without its subset file such a trainer would train on every label in a folder named for a subset; a file
    that names cases outside the fold's training cases or lacks a fold's lists is refused before training, with the
    file named and no stack trace."""
    trainer_class = _label_subset_trainer_class(trainer_name)
    ds = dataset_copy
    ids = [f"case_{i:03d}" for i in range(6)]
    save_json([{"train": ids[:5], "val": ids[5:]}], join(ds["preprocessed"], "splits_final.json"))
    trainer = _initialized_trainer(trainer_class, ds)
    path = join(ds["preprocessed"], LABEL_SUBSET_FILE)
    with pytest.raises(SystemExit, match=f"ERROR \\({trainer_name}\\): this trainer .*{LABEL_SUBSET_FILE} does not "
                                         f"exist: create it with 'nnUNetv2_bcp_label_subset -d "
                                         f"Dataset990_BCPSynthetic -k K'"):
        trainer.get_tr_and_val_datasets()
    save_json({"folds": {"0": {"labeled": ["case_005"], "unlabeled": ids[:5]}}}, path)  # a validation case
    with pytest.raises(SystemExit, match=f"{LABEL_SUBSET_FILE}: labeled cases \\['case_005'\\] are not training cases"):
        trainer.get_tr_and_val_datasets()
    save_json({"folds": {"0": {"labeled": ids[:2]}}}, path)
    with pytest.raises(SystemExit, match=f"{LABEL_SUBSET_FILE}: not a label subset file \\(fold 0 needs lists"):
        trainer.get_tr_and_val_datasets()


def test_pseudo_labels_take_a_label_subsets_dropped_cases_only_for_a_model_trained_on_the_subset(tmp_path, monkeypatch):
    """nnUNetv2_bcp_pseudo_label_dataset reads the model's trainer from its checkpoint: a model trained on every label
    (a subset file left beside it or not) gets no label-dropped cases to pseudo-label."""
    import nnunetv2_bcp
    from nnunetv2_bcp.unlabeled.pseudo_label_dataset import trained_on_label_subset
    monkeypatch.setenv("nnUNet_extTrainer", nnunetv2_bcp.ext_trainer_dir())
    for name, expected in (("nnUNetTrainerLabelSubset", True), ("nnUNetTrainerBCP_labelSubset", True),
                           ("nnUNetTrainer", False), ("nnUNetTrainerBCP", False), ("nnUNetTrainerNobodyHas", False)):
        path = str(tmp_path / f"{name}.pth")
        torch.save({"trainer_name": name, "network_weights": {}}, path)
        assert trained_on_label_subset(path) is expected, name


def _with_dataset_key(ds) -> dict:
    """ds's dataset.json in nnU-Net's other layout: a ``dataset`` entry listing each case's files, relative to the
    raw folder (written to raw and preprocessed, as nnU-Net's planning copies it); returns that dataset.json."""
    dataset_json = load_json(join(ds["raw"], "dataset.json"))
    ending = dataset_json["file_ending"]
    cases = sorted(f[:-len(ending)] for f in os.listdir(join(ds["raw"], "labelsTr")) if f.endswith(ending))
    dataset_json["dataset"] = {c: {"images": [f"imagesTr/{c}_0000{ending}"], "label": f"labelsTr/{c}{ending}"}
                               for c in cases}
    for folder in (ds["raw"], ds["preprocessed"]):
        save_json(dataset_json, join(folder, "dataset.json"), sort_keys=False)
    return dataset_json


def test_a_dataset_json_listing_its_cases_is_read_not_rewritten(dataset_copy):
    """nnU-Net makes a ``dataset`` entry's paths absolute in the dict it is given: the unlabeled data's fingerprint
    must still be the one of dataset.json as written, so that a node with nnU-Net_preprocessed only trains on it."""
    ds = dataset_copy
    ds["dataset_json"] = _with_dataset_key(ds)
    as_written = load_json(join(ds["preprocessed"], "dataset.json"))
    folder = _run(ds)
    assert ds["dataset_json"] == as_written
    shutil.rmtree(join(ds["raw"], "imagesUnlabeled"))  # a node with the preprocessed data only
    found = unlabeled_cases_for_training(ds["plans"], "3d_fullres", as_written, ds["raw"], ds["preprocessed"])
    assert found == (folder, [f"unl_{i:03d}" for i in range(4)])


def _stub_model_for_pseudo_labels(ds, dataset_json, monkeypatch, allowed_mirroring_axes=None) -> str:
    """A model folder for ``write_pseudo_label_dataset`` whose predictor (nnU-Net's, replaced) writes a reference label
    map per image and allows mirroring along ``allowed_mirroring_axes``, as a checkpoint would; returns the folder."""
    import nnunetv2.inference.predict_from_raw_data as predict_module
    ending = dataset_json["file_ending"]
    cases = sorted(dataset_json["dataset"])
    save_json([{"train": cases[:4], "val": cases[4:]}], join(ds["preprocessed"], "splits_final.json"))
    model = join(str(ds["raw"]) + "_model")
    os.makedirs(join(model, "fold_0"))
    torch.save({"trainer_name": "nnUNetTrainer"}, join(model, "fold_0", "checkpoint_final.pth"))
    a_label = join(ds["raw"], "labelsTr", f"{cases[0]}{ending}")

    class CopyingPredictor:  # writes a label map per image: what nnU-Net's predictor would, without a model
        def __init__(self, **kwargs):
            pass

        def initialize_from_trained_model_folder(self, *args):
            self.allowed_mirroring_axes = allowed_mirroring_axes

        def predict_from_files(self, images, outputs, **kwargs):
            for output in outputs:
                shutil.copy(a_label, output + ending)

    monkeypatch.setattr(predict_module, "nnUNetPredictor", CopyingPredictor)
    return model


def test_a_pseudo_label_dataset_of_a_dataset_json_listing_its_cases_lists_its_own_files(dataset_copy, monkeypatch):
    """The target's dataset.json must not keep the source's ``dataset`` entry: nnU-Net would preprocess the source's
    files (every label, none of the pseudo-labeled images) instead of the target's."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from nnunetv2_bcp.unlabeled.pseudo_label_dataset import write_pseudo_label_dataset
    ds = dataset_copy
    dataset_json = _with_dataset_key(ds)
    cases = sorted(dataset_json["dataset"])
    model = _stub_model_for_pseudo_labels(ds, dataset_json, monkeypatch)
    target = str(ds["raw"]) + "_pseudo"
    record = write_pseudo_label_dataset(ds["raw"], ds["preprocessed"], target, model, 0, device="cpu")
    assert record["pseudo_labeled"] == [f"unl_{i:03d}" for i in range(4)]
    listed = get_filenames_of_train_images_and_targets(target, load_json(join(target, "dataset.json")))
    assert sorted(listed) == sorted(cases + record["pseudo_labeled"])
    assert all(entry["label"].startswith(join(target, "labelsTr")) for entry in listed.values())


@pytest.mark.parametrize("allowed, requested, recorded", [(None, True, None), ((0, 1, 2), False, None),
                                                           ((np.int64(0), 1, 2), True, [0, 1, 2])])
def test_the_pseudo_label_record_names_the_axes_the_predictor_mirrored(dataset_copy, monkeypatch, allowed,
                                                                       requested, recorded):
    """nnU-Net mirrors only along the axes the model allows (none for a model trained without mirroring), whatever
    was requested: the record says what was done."""
    from nnunetv2_bcp.unlabeled.pseudo_label_dataset import write_pseudo_label_dataset
    ds = dataset_copy
    model = _stub_model_for_pseudo_labels(ds, _with_dataset_key(ds), monkeypatch, allowed)
    target = str(ds["raw"]) + "_pseudo"
    record = write_pseudo_label_dataset(ds["raw"], ds["preprocessed"], target, model, 0, device="cpu",
                                        use_mirroring=requested)
    assert record["mirror_axes"] == recorded and load_json(join(target, "bcp_pseudo_labels.json")) == record
