"""The ACDC paper-protocol recipe's conversion, on a tiny fake ACDC-like folder."""
import importlib.util
import os

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import join, load_json

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_acdc(root, num_patients=10):
    rng = np.random.default_rng(0)
    for p in range(1, num_patients + 1):
        folder = join(root, f"patient{p:03d}")
        os.makedirs(folder)
        for frame in (1, 12):
            case = join(folder, f"patient{p:03d}_frame{frame:02d}")
            sitk.WriteImage(sitk.GetImageFromArray(rng.random((4, 8, 8)).astype(np.float32)), case + ".nii.gz")
            sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 4, (4, 8, 8)).astype(np.uint8)), case + "_gt.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 8, 8), np.float32)),
                        join(folder, f"patient{p:03d}_4d.nii.gz"))  # not a labeled frame: ignored


def test_acdc_conversion_split_and_label_subset(tmp_path):
    acdc = _load("acdc_recipe")
    _fake_acdc(str(tmp_path / "training"))
    folder = acdc.convert(str(tmp_path / "training"), str(tmp_path / "raw"), 27, seed=0)
    split = load_json(join(folder, "acdc_split.json"))
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (7, 1, 2)
    assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])
    images_tr = sorted(os.listdir(join(folder, "imagesTr")))
    assert len(images_tr) == 16 and len(os.listdir(join(folder, "labelsTs"))) == 4
    assert all(f.endswith("_0000.nii.gz") for f in images_tr)
    assert not any(p in f for p in split["test"] for f in images_tr)  # test patients never in training
    dataset_json = load_json(join(folder, "dataset.json"))
    assert dataset_json["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert dataset_json["numTraining"] == 16

    pre = tmp_path / "pre"
    pre.mkdir()
    subset = acdc.write_split_and_subset(folder, str(pre), labeled_patients=3, seed=0)
    splits = load_json(str(pre / "splits_final.json"))
    assert len(splits[0]["train"]) == 14 and len(splits[0]["val"]) == 2
    labeled = subset["folds"]["0"]["labeled"]
    assert len(subset["labeled_patients"]) == 3 and len(labeled) == 6  # both frames of each labeled patient
    assert {c.split("_")[0] for c in labeled} == set(subset["labeled_patients"]) <= set(split["train"])
    assert sorted(labeled + subset["folds"]["0"]["unlabeled"]) == sorted(splits[0]["train"])
    assert "all" not in subset["folds"]
