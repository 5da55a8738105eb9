"""BCP on the kinds of dataset nnU-Net accepts: multi-channel + 2d, regions + ignore label, ignore label with an
odd batch size, batch size 1, ResEnc plans, anisotropic spacing, 3d_lowres — each trained through both stages with
nnUNetv2_train, resumed and predicted — and the cascade, refused through nnUNetv2_train with a message."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json, save_json
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from conftest import plan_and_preprocess, run_cli
from test_trainer import ext_trainer_env  # noqa: F401  (fixture)

# A small GPU memory target makes nnU-Net's own planner choose a patch far smaller than these 48^3 images, so it
# plans 3d_lowres and 3d_cascade_fullres as it would for large CT volumes.
SMALL_GPU_PLANS = ("-gpu_memory_target", "0.02", "-overwrite_plans_name", "nnUNetPlansSmallGPU")
KINDS = {
    # name: (dataset id, synthetic options, configuration, batch size override, planning options, plans name)
    "two_channels_2d": (981, dict(num_channels=2, shape=(12, 32, 32)), "2d", None, (), "nnUNetPlans"),
    "regions_ignore_3d": (982, dict(regions=True, ignore_label=True, shape=(16, 16, 16)), "3d_fullres", None, (),
                          "nnUNetPlans"),
    "ignore_odd_batch_3d": (983, dict(ignore_label=True, shape=(16, 16, 16)), "3d_fullres", 3, (), "nnUNetPlans"),
    "batch_size_one_3d": (984, dict(shape=(16, 16, 16)), "3d_fullres", 1, (), "nnUNetPlans"),
    "resenc_plans_3d": (985, dict(shape=(16, 16, 16)), "3d_fullres", None, ("-pl", "nnUNetPlannerResEncM"),
                        "nnUNetResEncUNetMPlans"),
    "anisotropic_3d": (986, dict(shape=(12, 40, 40), spacing=(3.0, 1.0, 1.0)), "3d_fullres", None, (),
                       "nnUNetPlans"),
    "lowres_3d": (987, dict(shape=(48, 48, 48)), "3d_lowres", None, SMALL_GPU_PLANS, "nnUNetPlansSmallGPU"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_bcp_trains_resumes_and_predicts(kind, nnunet_dirs, ext_trainer_env, tmp_path):  # noqa: F811
    from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset
    dataset_id, options, configuration, batch_size, planning, plans_name = KINDS[kind]
    folder = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], dataset_id, kind.replace("_", ""), num_labeled=5,
                                    num_unlabeled=3, num_test=1, **options)
    # nnU-Net's 3d_lowres validation also exports segmentations for the cascade, at 3d_fullres' preprocessing
    preprocessed = (configuration, "3d_fullres") if configuration == "3d_lowres" else (configuration,)
    plan_and_preprocess(dataset_id, preprocessed, planning)
    name = os.path.basename(folder)
    plans_file = join(nnunet_dirs["nnUNet_preprocessed"], name, plans_name + ".json")
    assert configuration in load_json(plans_file)["configurations"], "nnU-Net did not plan this configuration"
    if batch_size is not None:
        plans = load_json(plans_file)
        plans["configurations"][configuration]["batch_size"] = batch_size
        save_json(plans, plans_file, sort_keys=False)
    env = dict(ext_trainer_env, nnUNet_n_proc_DA="0")
    train = ["nnUNetv2_train", str(dataset_id), configuration, "0", "-tr", "nnUNetTrainerBCP_test", "-p", plans_name,
             "-device", "cpu"]
    crashed = run_cli(*train, env=dict(env, BCP_TEST_STOP_AFTER_EPOCH="2"), check=False)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    resumed = run_cli(*train, "--c", env=env)
    assert "student-teacher agreement on unlabeled voxels" in resumed.stdout
    fold = join(nnunet_dirs["nnUNet_results"], name, f"nnUNetTrainerBCP_test__{plans_name}__{configuration}", "fold_0")
    final = torch.load(join(fold, "checkpoint_final.pth"), weights_only=False, map_location="cpu")
    assert final["bcp"]["iteration"] == 4
    # boxes on the coarsest deep-supervision grid of these plans (anisotropic plans: a different stride per axis)
    arch = load_json(plans_file)["configurations"][configuration]["architecture"]["arch_kwargs"]
    strides = np.prod(arch["strides"][:-1], axis=0).tolist()
    assert load_json(join(fold, "bcp_settings.json"))["box_stride"] == strides
    if kind == "anisotropic_3d":
        assert len(set(strides)) > 1
    progress = load_json(join(fold, "bcp_progress.json"))
    assert len(progress[-1]["bcp_pseudo_fg_fraction"]) == 2  # two classes / two regions
    assert all(np.isfinite(p["bcp_loss_unlabeled"]) for p in progress)
    out = str(tmp_path / "pred")
    run_cli("nnUNetv2_predict", "-i", join(folder, "imagesTs"), "-o", out, "-d", str(dataset_id), "-c",
            configuration, "-f", "0", "-tr", "nnUNetTrainerBCP_test", "-p", plans_name, "-device", "cpu", env=env)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(join(out, "test_000.nii.gz")))
    assert pred.shape == tuple(options["shape"]) and set(np.unique(pred)) <= {0, 1, 2}
    if kind == "lowres_3d":  # the preprocessed unlabeled cases are at 3d_lowres' spacing
        plans = load_json(plans_file)["configurations"]
        assert plans[configuration]["spacing"][0] > 1.2 and "3d_cascade_fullres" in plans
        unlabeled = join(nnunet_dirs["nnUNet_preprocessed"], name, plans[configuration]["data_identifier"] +
                         "_unlabeled")
        assert len(load_json(join(unlabeled, "bcp_unlabeled.json"))["cases"]) == 3
        dataset = nnUNetDatasetBlosc2(unlabeled)
        data = dataset.load_case(dataset.identifiers[0])[0]
        assert data.shape[1:] == tuple(plans[configuration]["median_image_size_in_voxels"])  # 29^3, not 48^3
        cascade = run_cli("nnUNetv2_train", str(dataset_id), "3d_cascade_fullres", "0", "-tr",
                          "nnUNetTrainerBCP_test", "-p", plans_name, "-device", "cpu", env=env, check=False)
        assert cascade.returncode != 0
        assert "cascade configurations (3d_cascade_fullres) are not supported" in cascade.stderr
        assert "Traceback" not in cascade.stderr

