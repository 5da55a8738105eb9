"""nnU-Net's tools around training: finding the trainer beside other nnUNet_extTrainer folders, and one run through
cross-validation, find_best_configuration, ensembling, prediction and a model handed to plain nnU-Net."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json

from conftest import plan_and_preprocess, run_cli

OTHER_TRAINER = '''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerSomeoneElses(nnUNetTrainer):
    pass
'''

FIND_BOTH = '''
import json, os, sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

def modules():
    return [recursive_find_trainer_class_by_name(name).__module__
            for name in ("nnUNetTrainerBCP", "nnUNetTrainerLabelSubset", "nnUNetTrainerSomeoneElses")]

found = {"as exported": [os.environ["nnUNet_extTrainer"], modules()]}
os.environ["nnUNet_extTrainer"] = sys.argv[1]
found["other first"] = [sys.argv[1], modules()]
print(json.dumps(found))
'''


def test_ext_trainer_dir_command_appends_and_nnunet_finds_both(tmp_path):
    import nnunetv2_bcp
    ours = nnunetv2_bcp.ext_trainer_dir()
    assert run_cli("nnUNetv2_bcp_ext_trainer_dir").stdout == ours + "\n"
    other = tmp_path / "other_trainers"
    other.mkdir()
    (other / "someone_elses_trainers.py").write_text(OTHER_TRAINER)
    script = tmp_path / "find_both.py"
    script.write_text(FIND_BOTH)
    # the documented line, run by a shell where nnUNet_extTrainer already names another folder
    line = 'export nnUNet_extTrainer="$(nnUNetv2_bcp_ext_trainer_dir)${nnUNet_extTrainer:+:$nnUNet_extTrainer}"'
    env = dict(os.environ, nnUNet_extTrainer=str(other),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    result = subprocess.run(["bash", "-c", f'{line} && "{sys.executable}" "{script}" "$1"', "bash",
                             os.pathsep.join([str(other), ours])],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    both = ["nnunetv2_bcp.training.nnUNetTrainerBCP", "nnunetv2_bcp.training.nnUNetTrainerLabelSubset",
            "someone_elses_trainers"]
    assert found["as exported"] == [f"{ours}:{other}", both]
    assert found["other first"] == [f"{other}:{ours}", both]


# ---------------------------------------------------------------- export for plain nnU-Net
def test_export_keeps_what_inference_reads_and_the_files_nnunet_zips(tmp_path):
    from nnunetv2_bcp.export import export_for_plain_nnunet
    student, teacher = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    checkpoint = {"network_weights": student, "optimizer_state": {"state": {0: {"momentum_buffer": torch.ones(3)}}},
                  "grad_scaler_state": None, "logging": {"train_losses": [1.0]}, "_best_ema": 0.5,
                  "current_epoch": 1, "init_args": {"configuration": "3d_fullres"}, "trainer_name": "nnUNetTrainerBCP",
                  "inference_allowed_mirroring_axes": (0, 1, 2), "bcp": {"teacher_weights": teacher}}
    model = tmp_path / "nnUNetTrainerBCP__nnUNetPlans__3d_fullres"
    for name in ("plans.json", "dataset.json", "fold_0/progress.png", "fold_0/validation/summary.json",
                 "fold_0/validation/case_0.npz", "crossval_results_folds_0/postprocessing.pkl",
                 "crossval_results_folds_0/case_0.nii.gz"):
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_text(name)
    torch.save(checkpoint, model / "fold_0" / "checkpoint_final.pth")

    for use_teacher, weights in ((False, student), (True, teacher)):
        out = tmp_path / f"export_teacher_{use_teacher}"
        export_for_plain_nnunet(str(model), str(out), use_teacher=use_teacher)
        exported = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)
        assert torch.equal(exported.pop("network_weights")["w"], weights["w"])
        assert exported == {"current_epoch": 1, "init_args": {"configuration": "3d_fullres"},
                            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert copied == ["crossval_results_folds_0/postprocessing.pkl", "dataset.json", "fold_0/checkpoint_final.pth",
                      "fold_0/progress.png", "fold_0/validation/summary.json", "plans.json"]
    with pytest.raises(SystemExit, match="must differ"):
        export_for_plain_nnunet(str(model), str(model))
    with pytest.raises(SystemExit, match=f"{tmp_path / 'nowhere'} is not a folder: give a model folder"):
        export_for_plain_nnunet(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    # a stage-1 checkpoint: the teacher is still the network's random initialisation
    checkpoint["bcp"]["teacher_initialized"] = False
    torch.save(checkpoint, model / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(SystemExit, match="checkpoint_final.pth: its teacher was never trained .stage 1, epoch 1."):
        export_for_plain_nnunet(str(model), str(tmp_path / "untrained_teacher"), use_teacher=True)
    export_for_plain_nnunet(str(model), str(tmp_path / "stage_one_student"))  # the student is what stage 1 trained
    del checkpoint["bcp"]
    torch.save(checkpoint, model / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(SystemExit, match="holds no BCP teacher"):
        export_for_plain_nnunet(str(model), str(tmp_path / "no_teacher"), use_teacher=True)


# ---------------------------------------------------------------- cross-validation to a plain nnU-Net model
TOOLS_TRAINERS = '''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP


class nnUNetTrainerBCP_tools(nnUNetTrainerBCP):
    """One epoch of one iteration (stage 2 from the start: half of one epoch rounds to none)."""
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 1
        self.num_val_iterations_per_epoch = 1


class nnUNetTrainer_tools(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 1
        self.num_val_iterations_per_epoch = 1
'''

BCP = "nnUNetTrainerBCP_tools"
FOLDS = ("0", "1", "2", "3", "4")  # nnU-Net's five-fold cross-validation, as a challenge submission trains it
CROSSVAL = "crossval_results_folds_" + "_".join(FOLDS)


def _segmentations(folder):
    return {f: sitk.GetArrayFromImage(sitk.ReadImage(join(folder, f)))
            for f in sorted(os.listdir(folder)) if f.endswith(".nii.gz")}


@pytest.mark.heavy(1)
def test_cross_validation_to_a_model_for_plain_nnunet(nnunet_dirs, tmp_path):
    from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset
    from nnunetv2_bcp.export import INFERENCE_KEYS
    # 16^3 voxels (not the shared 32^3 dataset): a network of a few MB trains and predicts in a fraction of the time
    dataset_id = "995"
    raw = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], int(dataset_id), "Tools", num_labeled=5,
                                 num_unlabeled=2, num_test=2, shape=(16, 16, 16))
    plan_and_preprocess(int(dataset_id))
    dataset = os.path.basename(raw)
    trainers = tmp_path / "ext"
    trainers.mkdir()
    (trainers / "tools_trainers.py").write_text(TOOLS_TRAINERS)
    import nnunetv2_bcp
    # one validation-export worker, no augmentation workers: fewer process starts, each of which imports nnU-Net
    env = {"nnUNet_extTrainer": os.pathsep.join([nnunetv2_bcp.ext_trainer_dir(), str(trainers)]),
           "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
    model = join(nnunet_dirs["nnUNet_results"], dataset, f"{BCP}__nnUNetPlans__3d_fullres")

    for fold in FOLDS:
        run_cli("nnUNetv2_train", dataset_id, "3d_fullres", fold, "-tr", BCP, "-device", "cpu", "--npz", env=env)
    run_cli("nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", "nnUNetTrainer_tools", "-device", "cpu", "--npz",
            env=env)

    run_cli("nnUNetv2_find_best_configuration", dataset_id, "-c", "3d_fullres", "-tr", BCP, "-f", *FOLDS, "-np", "1",
            env=env)
    inference = load_json(join(nnunet_dirs["nnUNet_results"], dataset, "inference_information.json"))
    assert inference["best_model_or_ensemble"]["selected_model_or_models"] == \
        [{"configuration": "3d_fullres", "trainer": BCP, "plans_identifier": "nnUNetPlans"}]
    assert isfile(join(model, CROSSVAL, "postprocessing.pkl"))

    images = join(raw, "imagesTs")
    # -npp 0 -nps 0: preprocessing and export in the predicting process (no worker starts); no mirroring
    predict = ("nnUNetv2_predict", "-i", images, "-d", dataset_id, "-c", "3d_fullres", "-device", "cpu", "-npp", "0",
               "-nps", "0", "--disable_tta")
    best = str(tmp_path / "pred_bcp_best")
    run_cli(*predict, "-o", best, "-tr", BCP, "-f", *FOLDS, "-chk", "checkpoint_best.pth", "--save_probabilities",
            env=env)
    baseline = str(tmp_path / "pred_baseline")
    run_cli(*predict, "-o", baseline, "-tr", "nnUNetTrainer_tools", "-f", "0", "--save_probabilities", env=env)
    ensemble = str(tmp_path / "ensemble")
    run_cli("nnUNetv2_ensemble", "-i", best, baseline, "-o", ensemble, "-np", "1")
    a, b, e = _segmentations(best), _segmentations(baseline), _segmentations(ensemble)
    assert e.keys() == a.keys() == {"test_000.nii.gz", "test_001.nii.gz"}
    for case in e:  # the mean of two probability maps takes the class both put first
        agree = a[case] == b[case]
        assert np.array_equal(e[case][agree], a[case][agree])

    # the hand-out: exported, zipped, installed into a results folder where only plain nnU-Net runs
    export_root = str(tmp_path / "export_results")
    exported = join(export_root, dataset, f"{BCP}__nnUNetPlans__3d_fullres")
    run_cli("nnUNetv2_bcp_export", "-i", model, "-o", exported, "-f", *FOLDS)
    for fold in FOLDS:
        trained = join(model, f"fold_{fold}", "checkpoint_final.pth")
        plain = join(exported, f"fold_{fold}", "checkpoint_final.pth")
        checkpoint = torch.load(plain, weights_only=False, map_location="cpu")
        assert set(checkpoint) == set(INFERENCE_KEYS) and checkpoint["trainer_name"] == "nnUNetTrainer"
        # the training checkpoint holds the student, the teacher and SGD's momentum buffer, each as large: with
        # either of the last two left in, the export would weigh two thirds of it
        assert os.path.getsize(plain) < 0.5 * os.path.getsize(trained)
        # one epoch: the best checkpoint is the final one, so the predictions below must agree
        best_weights = torch.load(join(model, f"fold_{fold}", "checkpoint_best.pth"), weights_only=False,
                                  map_location="cpu")["network_weights"]
        assert all(torch.equal(w, best_weights[k]) for k, w in checkpoint["network_weights"].items())
    zip_file = str(tmp_path / "model.zip")
    run_cli("nnUNetv2_export_model_to_zip", "-d", dataset_id, "-o", zip_file, "-c", "3d_fullres", "-tr", BCP,
            "-f", *FOLDS, env={"nnUNet_results": export_root})

    shadow = tmp_path / "no_plugin"  # shadows the installed plugin: importing it fails
    (shadow / "nnunetv2_bcp").mkdir(parents=True)
    (shadow / "nnunetv2_bcp" / "__init__.py").write_text("raise ImportError('nnunetv2_bcp is not installed')\n")
    plain_results = str(tmp_path / "plain_results")
    os.makedirs(plain_results)
    # a machine with the model alone: no plugin, no trainer folder, no raw or preprocessed data
    plain_env = {k: v for k, v in os.environ.items()
                 if k not in ("nnUNet_extTrainer", "nnUNet_raw", "nnUNet_preprocessed")}
    plain_env.update(nnUNet_results=plain_results, PYTHONPATH=str(shadow))
    no_plugin = subprocess.run([sys.executable, "-c", "import nnunetv2_bcp"], env=plain_env, capture_output=True,
                               text=True)
    assert no_plugin.returncode != 0 and "nnunetv2_bcp is not installed" in no_plugin.stderr

    def run_plain(*args):
        result = subprocess.run([join(os.path.dirname(sys.executable), args[0]), *args[1:]], env=plain_env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    run_plain("nnUNetv2_install_pretrained_model_from_zip", zip_file)
    installed = join(plain_results, dataset, f"{BCP}__nnUNetPlans__3d_fullres")
    plain_prediction = str(tmp_path / "pred_plain_nnunet")
    run_plain(*predict, "-o", plain_prediction, "-tr", BCP, "-f", *FOLDS)
    postprocessed = str(tmp_path / "pred_plain_nnunet_pp")
    run_plain("nnUNetv2_apply_postprocessing", "-i", plain_prediction, "-o", postprocessed, "-np", "1",
              "-pp_pkl_file", join(installed, CROSSVAL, "postprocessing.pkl"),
              "-plans_json", join(installed, "plans.json"))
    plain_segmentations = _segmentations(plain_prediction)
    assert plain_segmentations.keys() == a.keys()
    for case, segmentation in plain_segmentations.items():
        assert np.array_equal(segmentation, a[case])
    assert _segmentations(postprocessed).keys() == a.keys()


# ---------------------------------------------------------------- offline pseudo-labels (the maintainers' recipe)
@pytest.mark.heavy(5)
def test_pseudo_label_dataset_predicts_the_unlabeled_cases_and_continues_the_model(nnunet_dirs, tmp_path,
                                                                                  monkeypatch):
    from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset
    source_id, target_id = "971", "972"
    raw = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], int(source_id), "Pseudo", num_labeled=5,
                                 num_unlabeled=3, num_test=1, shape=(16, 16, 16))
    plan_and_preprocess(int(source_id))
    trainers = tmp_path / "ext"
    trainers.mkdir()
    (trainers / "tools_trainers.py").write_text(TOOLS_TRAINERS)
    import nnunetv2_bcp
    env = {"nnUNet_extTrainer": os.pathsep.join([nnunetv2_bcp.ext_trainer_dir(), str(trainers)]),
           "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
    run_cli("nnUNetv2_train", source_id, "3d_fullres", "0", "-tr", "nnUNetTrainer_tools", "-device", "cpu", env=env)
    source_split = load_json(join(nnunet_dirs["nnUNet_preprocessed"], os.path.basename(raw), "splits_final.json"))[0]
    command = ("nnUNetv2_bcp_pseudo_label_dataset", "-d", source_id, "-c", "3d_fullres", "-f", "0", "-tr",
               "nnUNetTrainer_tools", "-device", "cpu", "-np", "1", "--disable_tta")

    run_cli(*command, "-t", target_id, env=env)
    target = "Dataset972_PseudoPseudo"
    target_raw = join(nnunet_dirs["nnUNet_raw"], target)
    unlabeled = ["unl_000", "unl_001", "unl_002"]
    for case in unlabeled:  # a label map of the image's geometry, with the dataset's labels only
        image = sitk.ReadImage(join(raw, "imagesUnlabeled", f"{case}_0000.nii.gz"))
        pseudo = sitk.ReadImage(join(target_raw, "labelsTr", f"{case}.nii.gz"))
        assert pseudo.GetSize() == image.GetSize() and pseudo.GetSpacing() == image.GetSpacing()
        assert set(np.unique(sitk.GetArrayFromImage(pseudo))) <= {0, 1, 2}
    for case in source_split["train"] + source_split["val"]:  # labeled cases keep their own labels
        assert os.path.realpath(join(target_raw, "labelsTr", f"{case}.nii.gz")) == \
            os.path.realpath(join(raw, "labelsTr", f"{case}.nii.gz"))
    target_pre = join(nnunet_dirs["nnUNet_preprocessed"], target)
    splits = load_json(join(target_pre, "splits_final.json"))
    assert splits == [{"train": sorted(source_split["train"] + unlabeled), "val": sorted(source_split["val"])}]
    assert load_json(join(target_pre, "nnUNetPlans.json"))["dataset_name"] == target
    assert isfile(join(target_pre, "nnUNetPlans_3d_fullres", "unl_000.b2nd"))

    # the model continues on labels + pseudo-labels with all its weights
    model = join(nnunet_dirs["nnUNet_results"], os.path.basename(raw), "nnUNetTrainer_tools__nnUNetPlans__3d_fullres",
                 "fold_0", "checkpoint_final.pth")
    run_cli("nnUNetv2_bcp_start_from_model", target_id, "3d_fullres", "0", "-tr", "nnUNetTrainer_tools", "-m", model,
            env=env)
    run_cli("nnUNetv2_train", target_id, "3d_fullres", "0", "-tr", "nnUNetTrainer_tools", "-device", "cpu", "--c",
            env=env)
    assert isfile(join(nnunet_dirs["nnUNet_results"], target, "nnUNetTrainer_tools__nnUNetPlans__3d_fullres",
                       "fold_0", "checkpoint_final.pth"))

    # refusals, before any prediction (in this process: the command's main)
    from nnunetv2_bcp.unlabeled.pseudo_label_dataset import main, refuse_to_replace
    with pytest.raises(SystemExit, match=f"dataset id {source_id} is taken by {os.path.basename(raw)}"):
        main([*command[1:], "-t", source_id])
    with pytest.raises(SystemExit, match="is the source dataset"):
        main([*command[1:], "-t", source_id, "-tname", "Pseudo"])
    foreign = join(nnunet_dirs["nnUNet_raw"], "Dataset974_Foreign")
    os.makedirs(foreign)
    with pytest.raises(SystemExit, match="Dataset974_Foreign exists and was not written by this command"):
        main([*command[1:], "-t", "974", "-tname", "Foreign"])
    assert isfile(join(raw, "dataset.json")) and os.path.isdir(foreign)
    refuse_to_replace(raw, target_raw)  # its own earlier output may be replaced
    # a run that fails while predicting leaves a folder that the next run may replace
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    def fail(*args, **kwargs):
        raise RuntimeError("stopped while predicting")
    monkeypatch.setattr(nnUNetPredictor, "initialize_from_trained_model_folder", fail)
    with pytest.raises(RuntimeError, match="stopped while predicting"):
        main([*command[1:], "-t", "975", "-tname", "Stopped"])
    stopped = join(nnunet_dirs["nnUNet_raw"], "Dataset975_Stopped")
    assert load_json(join(stopped, "bcp_pseudo_labels.json"))["complete"] is False
    refuse_to_replace(raw, stopped)
    shutil.rmtree(join(raw, "imagesUnlabeled"))
    with pytest.raises(SystemExit, match="has no unlabeled images for fold 0"):
        main([*command[1:], "-t", "973"])
