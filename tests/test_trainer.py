"""nnUNetTrainerBCP: end to end through nnU-Net's commands, and tests that prove the wiring."""
import copy
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from conftest import foreground_dice, plan_and_preprocess, run_cli

TEST_TRAINERS = '''
import os
from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP


class nnUNetTrainerBCP_test(nnUNetTrainerBCP):
    """2 epochs of stage 1, then stage 2, a checkpoint every epoch; stops after epoch BCP_TEST_STOP_AFTER_EPOCH."""
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("BCP_TEST_EPOCHS", 4))
        self.bcp_pretrain_epochs = 2
        self.bcp_max_pretrain_epochs = 2  # stage 2 from epoch 2 in any case (the stage-1 guard is tested in-process)
        self.num_iterations_per_epoch = int(os.environ.get("BCP_TEST_ITERATIONS", 2))
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    def on_epoch_end(self):
        super().on_epoch_end()
        stop = os.environ.get("BCP_TEST_STOP_AFTER_EPOCH")
        if stop is not None and self.current_epoch == int(stop) + 1:
            raise SystemExit(3)  # a crash right after the checkpoint of that epoch


class nnUNetTrainerBCP_test_labelSubset(nnUNetTrainerBCP_test):
    uses_label_subset = True
'''


@pytest.fixture(scope="session")
def ext_trainer_env(tmp_path_factory):
    import nnunetv2_bcp
    folder = tmp_path_factory.mktemp("ext_trainers")
    (folder / "bcp_test_trainers.py").write_text(TEST_TRAINERS)
    return {"nnUNet_extTrainer": os.pathsep.join([nnunetv2_bcp.ext_trainer_dir(), str(folder)])}


FIRST_CONV = "encoder.stages.0.0.convs.0.conv.weight"  # receives gradients (the coarsest DS head does not)


def _results_folder(dataset_name, trainer, config="3d_fullres"):
    return join(os.environ["nnUNet_results"], dataset_name, f"{trainer}__nnUNetPlans__{config}")



# iterations per epoch of the end-to-end run: enough for the student to find the synthetic objects (see below)
E2E_ITERATIONS = 10


@pytest.fixture(scope="module")
def small_3d(nnunet_dirs):
    """Dataset996: 6 labeled + 4 unlabeled + 2 test cases of 16^3 voxels (a network of a few MB: command-line runs
    train and predict in a fraction of the shared 32^3 dataset's time)."""
    from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset
    folder = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], 996, "EndToEnd", num_labeled=6, num_unlabeled=4,
                                    num_test=2, shape=(16, 16, 16))
    plan_and_preprocess(996)
    return {"raw": folder, "preprocessed": join(nnunet_dirs["nnUNet_preprocessed"], os.path.basename(folder))}


@pytest.mark.heavy(3)
def test_train_resume_predict_end_to_end(small_3d, ext_trainer_env, tmp_path):
    synthetic_3d = small_3d
    env = dict(ext_trainer_env, nnUNet_n_proc_DA="2", BCP_TEST_ITERATIONS=str(E2E_ITERATIONS))
    crashed = run_cli("nnUNetv2_train", "996", "3d_fullres", "0", "-tr", "nnUNetTrainerBCP_test", "-device", "cpu",
                      env=dict(env, BCP_TEST_STOP_AFTER_EPOCH="2"), check=False)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    fold = join(_results_folder("Dataset996_EndToEnd", "nnUNetTrainerBCP_test"), "fold_0")
    latest = torch.load(join(fold, "checkpoint_latest.pth"), weights_only=False, map_location="cpu")
    assert latest["current_epoch"] == 3 and latest["bcp"]["teacher_initialized"]
    assert latest["bcp"]["iteration"] == E2E_ITERATIONS  # one stage-2 epoch
    # the teacher is an EMA, not a copy of the student
    w_student = latest["network_weights"][FIRST_CONV]
    w_teacher = latest["bcp"]["teacher_weights"][FIRST_CONV]
    assert not torch.equal(w_student, w_teacher)

    resumed = run_cli("nnUNetv2_train", "996", "3d_fullres", "0", "-tr", "nnUNetTrainerBCP_test", "-device", "cpu",
                      "--c", env=env)
    log = resumed.stdout
    assert "Epoch 3" in log and "Epoch 2\n" not in log and "BCP stage 2" in log
    assert "teacher initialised from the student" not in log  # restored from the checkpoint instead
    assert "student-teacher agreement on unlabeled voxels" in log
    final = torch.load(join(fold, "checkpoint_final.pth"), weights_only=False, map_location="cpu")
    assert final["bcp"]["iteration"] == 2 * E2E_ITERATIONS and final["current_epoch"] == 4
    assert not os.path.exists(join(fold, "checkpoint_latest.pth"))
    settings = load_json(join(fold, "bcp_settings.json"))
    assert settings["bcp_alpha"] == 0.5 and settings["bcp_pretrain_epochs"] == 2
    strides = load_json(join(small_3d["preprocessed"], "nnUNetPlans.json"))["configurations"]["3d_fullres"][
        "architecture"]["arch_kwargs"]["strides"]
    assert settings["box_stride"] == np.prod(strides[:-1], axis=0).tolist()  # the coarsest deep-supervision grid
    progress = load_json(join(fold, "bcp_progress.json"))
    assert [p["epoch"] for p in progress] == [2, 3] and len(progress[0]["bcp_pseudo_fg_fraction"]) == 2
    assert os.path.isfile(join(fold, "progress.png")) and os.path.isfile(join(fold, "validation", "summary.json"))

    os.remove(join(fold, "validation", "summary.json"))
    run_cli("nnUNetv2_train", "996", "3d_fullres", "0", "-tr", "nnUNetTrainerBCP_test", "-device", "cpu", "--val",
            env=env)
    assert os.path.isfile(join(fold, "validation", "summary.json"))

    out = str(tmp_path / "pred")
    run_cli("nnUNetv2_predict", "-i", join(synthetic_3d["raw"], "imagesTs"), "-o", out, "-d", "996", "-c",
            "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerBCP_test", "-device", "cpu", "-npp", "1", "-nps", "1",
            env=env)
    for case in ("test_000", "test_001"):
        pred = sitk.GetArrayFromImage(sitk.ReadImage(join(out, case + ".nii.gz")))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(join(synthetic_3d["raw"], "labelsTs", case + ".nii.gz")))
        assert pred.shape == ref.shape and set(np.unique(pred)) <= {0, 1, 2}
        # The object fills 1.4-6.5% of the volume (radii 0.15-0.25 of the side): an empty prediction scores 0 and
        # an all-foreground one at most 0.13, so above 0.5 the model has found the object.
        assert foreground_dice(pred, ref) > 0.5, case
    # the model handed to plain nnU-Net (nnUNetv2_bcp_export) predicts the same: test_nnunet_tools.py


@pytest.mark.heavy(4)
def test_refused_without_unlabeled_images_then_a_label_subset_trains_without_reading_dropped_labels(
        nnunet_dirs, ext_trainer_env):
    """A user's path: no unlabeled images, refused with the remedy named; the remedy (a label subset) then trains
    without ever reading the dropped labels."""
    from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset
    folder = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], 994, "Subset", num_labeled=10, num_unlabeled=0,
                                    num_test=0, shape=(16, 16, 16))
    shutil.rmtree(join(folder, "imagesUnlabeled"))
    plan_and_preprocess(994)
    env = dict(ext_trainer_env, nnUNet_n_proc_DA="0")
    result = run_cli("nnUNetv2_train", "994", "3d_fullres", "0", "-tr", "nnUNetTrainerBCP_test", "-device", "cpu",
                     env=env, check=False)
    assert result.returncode != 0
    assert "needs unlabeled images and found none" in result.stderr
    assert join(folder, "imagesUnlabeled") in result.stderr and "nnUNetv2_bcp_label_subset" in result.stderr
    assert "Traceback" not in result.stderr
    # an empty imagesUnlabeled folder gets the same message
    from nnunetv2_bcp import nnUNetTrainerBCP
    from nnunetv2_bcp.unlabeled.raw import UnlabeledDataError
    os.makedirs(join(folder, "imagesUnlabeled"))
    pre = join(nnunet_dirs["nnUNet_preprocessed"], "Dataset994_Subset")
    plans = dict(load_json(join(pre, "nnUNetPlans.json")), continue_training=False)
    trainer = nnUNetTrainerBCP(plans, "3d_fullres", 0, load_json(join(pre, "dataset.json")), torch.device("cpu"))
    trainer.initialize()
    with pytest.raises(UnlabeledDataError, match="needs unlabeled images and found none"):
        trainer._unlabeled_keys()
    os.rmdir(join(folder, "imagesUnlabeled"))  # the remedy below, for a dataset without that folder

    run_cli("nnUNetv2_bcp_label_subset", "-d", "994", "-k", "2")
    # the subset is explicit: a trainer that does not opt in leaves it unused (and says so), so still no unlabeled data
    result = run_cli("nnUNetv2_train", "994", "3d_fullres", "0", "-tr", "nnUNetTrainerBCP_test", "-device", "cpu",
                     env=env, check=False)
    assert result.returncode != 0 and "needs unlabeled images and found none" in result.stderr
    assert "to use the label subset in" in result.stderr and "which nnUNetTrainerBCP_test leaves unused" in \
        result.stderr
    subset = load_json(join(pre, "bcp_label_subset.json"))["folds"]["0"]
    for case in subset["unlabeled"]:  # destroy every trace of the dropped labels
        os.remove(join(pre, "nnUNetPlans_3d_fullres", case + "_seg.b2nd"))
        with open(join(folder, "labelsTr", case + ".nii.gz"), "wb") as f:
            f.write(b"destroyed")
    result = run_cli("nnUNetv2_train", "994", "3d_fullres", "0", "-tr", "nnUNetTrainerBCP_test_labelSubset",
                     "-device", "cpu", env=dict(env, BCP_TEST_EPOCHS="3"))
    assert "label subset in effect" in result.stdout
    assert "2 labeled training cases, 6 training cases with their labels dropped" in result.stdout
    assert "BCP unlabeled stream: 6 cases" in result.stdout and "BCP stage 2" in result.stdout


# ---------------------------------------------------------------- in-process wiring tests
@pytest.fixture
def trainer(synthetic_3d):
    from nnunetv2_bcp import nnUNetTrainerBCP
    plans = load_json(join(synthetic_3d["preprocessed"], "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(join(synthetic_3d["preprocessed"], "dataset.json"))
    t = nnUNetTrainerBCP(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    t.initialize()
    t.current_epoch = t.pretrain_epochs()  # stage 2
    t.teacher.load_state_dict(t.network.state_dict())
    t.bcp_teacher_initialized = True
    return t


def _batches(trainer, seed):
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    labeled = {"data": torch.randn(2, 1, *patch, generator=g), "keys": ["a", "b"],
               "target": [torch.randint(0, 3, (2, 1, *[round(p * s) for p, s in zip(patch, sc)]), generator=g,
                                        dtype=torch.int16) for sc in scales]}
    unlabeled = {"data": torch.randn(2, 1, *patch, generator=g), "keys": ["u", "v"]}  # no 'target': never read
    return labeled, unlabeled


def _state(trainer):
    return copy.deepcopy((trainer.network.state_dict(), trainer.teacher.state_dict(),
                          trainer.optimizer.state_dict()))


def _restore(trainer, state):
    trainer.network.load_state_dict(state[0])
    trainer.teacher.load_state_dict(state[1])
    trainer.optimizer.load_state_dict(state[2])


def test_stage_two_loss_depends_on_the_unlabeled_images(trainer):
    labeled, unlabeled = _batches(trainer, 0)
    state = _state(trainer)
    torch.manual_seed(1)
    a = trainer.stage_two_step(labeled, unlabeled)
    _restore(trainer, state)
    trainer.bcp_iteration = 0
    torch.manual_seed(1)
    again = trainer.stage_two_step(labeled, unlabeled)
    assert np.isclose(a["loss"], again["loss"])  # same inputs, same box: same loss
    _restore(trainer, state)
    trainer.bcp_iteration = 0
    changed = {"data": unlabeled["data"] * -1 + 0.5, "keys": unlabeled["keys"]}
    torch.manual_seed(1)
    b = trainer.stage_two_step(labeled, changed)
    assert not np.isclose(a["loss"], b["loss"])
    figures = a["bcp"]  # per-step figures stay on the device until the epoch ends
    assert 0 <= figures["bcp_agreement"] <= 1 and figures["bcp_pseudo_fg_fraction"].shape == (2,)
    # the default's step adds nnU-Net's loss on the un-mixed labeled patches (test_stages.py checks that term)
    supervised = float(a["loss"]) - float(figures["bcp_loss_labeled"]) - 0.5 * float(figures["bcp_loss_unlabeled"])
    assert trainer.bcp_labeled_loss_weight == 1.0 and abs(supervised) > 1e-4  # nnU-Net's loss can be negative
    # the paper's loss alone: the step's loss is its two α-weighted terms (an α other than the default)
    trainer.bcp_labeled_loss_weight, trainer.bcp_alpha = 0.0, 0.3
    _restore(trainer, state)
    trainer.bcp_iteration = 0
    torch.manual_seed(1)
    paper = trainer.stage_two_step(labeled, unlabeled)
    figures = paper["bcp"]
    assert np.isclose(paper["loss"], figures["bcp_loss_labeled"] + 0.3 * figures["bcp_loss_unlabeled"], rtol=1e-5)
    # the box: bcp_mask_ratio of the patch per axis (on the stride grid), one box for the batch
    from nnunetv2_bcp.bcp import box_size
    patch = trainer.configuration_manager.patch_size
    for ratio in (0.5, 0.8):
        trainer.bcp_mask_ratio = ratio
        mask = trainer._random_mask(2)
        inside = int((mask[0, 0] == 0).sum())
        assert inside == int(np.prod(box_size(patch, ratio, trainer.bcp_box_stride())))
        assert torch.equal(mask[0], mask[1])
    # half of each batch goes each way, drawn anew at each step (nnU-Net puts its forced-foreground patches last)
    draws = {tuple(trainer.draw_directions(4).tolist()) for _ in range(30)}
    assert all(sum(d) == 2 for d in draws) and len(draws) > 1


def test_teacher_is_the_ema_of_the_student_trajectory(trainer):
    from nnunetv2_bcp.bcp import unwrap_network
    name = FIRST_CONV
    teacher = trainer.teacher.state_dict()[name].clone()
    trainer.bcp_ema_decay = 0.9
    for step in range(3):
        trainer.stage_two_step(*_batches(trainer, step))
        teacher = 0.9 * teacher + 0.1 * unwrap_network(trainer.network).state_dict()[name]
    assert torch.allclose(trainer.teacher.state_dict()[name], teacher, atol=1e-6)
    assert not torch.allclose(trainer.teacher.state_dict()[name], trainer.network.state_dict()[name])


def test_where_nnunet_compiles_the_student_the_teacher_is_compiled_too(synthetic_3d, monkeypatch):
    """nnU-Net compiles only on CUDA; here its decision is forced and torch.compile traces with the eager backend, so
    the wiring runs on the CPU (the compiled path on a GPU is test_cuda.py's)."""
    import functools
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch._dynamo import OptimizedModule
    from nnunetv2_bcp import nnUNetTrainerBCP
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    plans = load_json(join(synthetic_3d["preprocessed"], "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(join(synthetic_3d["preprocessed"], "dataset.json"))
    trainer = nnUNetTrainerBCP(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    assert isinstance(trainer.network, OptimizedModule)
    assert isinstance(trainer.teacher_forward, OptimizedModule) and trainer.teacher_forward._orig_mod is trainer.teacher
    assert not isinstance(trainer.teacher, OptimizedModule)  # the EMA and the checkpoint see the plain module
    trainer.current_epoch = trainer.pretrain_epochs()
    trainer.begin_stage_two()
    trainer.bcp_ema_decay = 0.5
    for step in range(2):  # the compiled forward pass follows the teacher's in-place EMA updates
        labeled, unlabeled = _batches(trainer, step)
        assert np.isfinite(trainer.stage_two_step(labeled, unlabeled)["loss"])
        with torch.no_grad():
            assert torch.allclose(trainer.teacher_forward(unlabeled["data"]), trainer.teacher(unlabeled["data"]))
    assert not [k for k in trainer.bcp_state()["teacher_weights"] if "_orig_mod" in k]


def test_a_loss_bcp_cannot_mirror_is_refused_naming_the_hook_that_replaces_it(synthetic_3d):
    """A trainer variant whose nnU-Net loss smooths its labels: BCPLoss would drop that, so initialize refuses and
    names the hook; overriding the hook (as nnU-Net's ``_build_loss``) is the way, and its loss is the one used."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2_bcp import nnUNetTrainerBCP
    from nnunetv2_bcp.bcp import BCPLoss

    class SmoothedLabels(nnUNetTrainerBCP):
        def _build_loss(self):
            loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                  {"label_smoothing": 0.1}, dice_class=MemoryEfficientSoftDiceLoss)
            return DeepSupervisionWrapper(loss, [1.0] + [0.5 ** i for i in range(1, 4)])

    class OwnBCPLoss(SmoothedLabels):
        def _build_bcp_loss(self):
            loss = BCPLoss(MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x, 1), do_bg=False))
            return DeepSupervisionWrapper(loss, self.loss.weight_factors)

    plans = load_json(join(synthetic_3d["preprocessed"], "nnUNetPlans.json"))
    dataset_json = load_json(join(synthetic_3d["preprocessed"], "dataset.json"))
    refused = SmoothedLabels(dict(plans, continue_training=False), "3d_fullres", 0, dataset_json, torch.device("cpu"))
    with pytest.raises(ValueError, match="label smoothing.*override _build_bcp_loss"):
        refused.initialize()
    class FullResolutionBCPLoss(SmoothedLabels):  # the BCP term at full resolution, nnU-Net's loss deeply supervised
        def _build_bcp_loss(self):
            return BCPLoss(MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x, 1), do_bg=False))

    for variant in (OwnBCPLoss, FullResolutionBCPLoss):
        trainer = variant(dict(plans, continue_training=False), "3d_fullres", 0, dataset_json, torch.device("cpu"))
        trainer.initialize()
        own = trainer.bcp_loss.loss if variant is OwnBCPLoss else trainer.bcp_loss
        assert isinstance(own, BCPLoss) and own.dice_loss.do_bg is False
        trainer.current_epoch = trainer.pretrain_epochs()
        trainer.begin_stage_two()
        assert trainer.bcp_labeled_loss_weight > 0  # the supervised term goes through nnU-Net's (wrapped) loss
        assert np.isfinite(trainer.stage_two_step(*_batches(trainer, 0))["loss"])


def test_an_eager_student_has_an_eager_teacher(trainer):
    assert trainer.teacher_forward is trainer.teacher


def test_saved_student_and_teacher_predict_like_in_memory(trainer, tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    trainer.stage_two_step(*_batches(trainer, 5))
    path = str(tmp_path / "ckpt.pth")
    trainer.save_checkpoint(path)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    ckpt = torch.load(path, weights_only=False)
    net = nnUNetTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, False)
    net.load_state_dict(ckpt["network_weights"])
    teacher = nnUNetTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                                       False)
    teacher.load_state_dict(ckpt["bcp"]["teacher_weights"])
    x = torch.randn(1, 1, *trainer.configuration_manager.patch_size)
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), trainer.network(x), atol=1e-5)
        assert torch.allclose(teacher.eval()(x), trainer.teacher(x), atol=1e-5)


def test_nonfinite_loss_skips_the_step_names_the_cases_and_keeps_the_teacher(trainer):
    labeled, unlabeled = _batches(trainer, 0)
    labeled["data"][:, :, :2] = float("nan")  # kept in every mixed sample, whichever its direction and box
    teacher = copy.deepcopy(trainer.teacher.state_dict())
    student = copy.deepcopy(trainer.network.state_dict())
    out = trainer.stage_two_step(labeled, unlabeled)
    assert np.isnan(out["loss"])
    assert all(torch.equal(v, teacher[k]) for k, v in trainer.teacher.state_dict().items())
    assert all(torch.equal(v, student[k]) for k, v in trainer.network.state_dict().items())
    log = open(trainer.log_file).read()
    assert "step skipped, teacher not updated" in log and "['a', 'b']" in log and "['u', 'v']" in log
    # the epoch's training loss (log, progress.png) is that of the steps taken
    taken = trainer.stage_two_step(*_batches(trainer, 1))
    trainer.on_train_epoch_end([out, taken])
    assert trainer.logger.get_value("train_losses", step=None)[-1] == pytest.approx(float(taken["loss"]))
    trainer.on_train_epoch_end([{"loss": np.array(float("nan"))}, taken])  # a step that ran (nnU-Net's, stage 1)
    assert np.isnan(trainer.logger.get_value("train_losses", step=None)[-1])
    trainer.bcp_max_nonfinite_steps = 2
    trainer.bcp_nonfinite_in_a_row = 1
    with pytest.raises(FloatingPointError, match="2 non-finite steps in a row"):
        trainer.stage_two_step(labeled, unlabeled)


class _StandInGradScaler:
    """What torch's GradScaler does on CUDA, for the CPU: on a step whose unscaled gradients are not finite it skips
    ``optimizer.step`` and lowers its scale."""
    def __init__(self):
        self.scale_factor, self.skipped = 1024.0, 0

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        pass

    def step(self, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            optimizer.step()
        else:
            self.skipped += 1

    def update(self):
        if self.skipped:
            self.scale_factor /= 2


def test_a_step_the_grad_scaler_skips_is_routine_not_a_failure(trainer):
    """Mixed precision: fp16 gradients that overflow from a finite loss make the scaler skip the step; nnU-Net goes
    on silently. BCP returns the step's finite loss, warns about nothing, counts nothing toward the abort, and leaves
    student and teacher as they were."""
    trainer.grad_scaler = _StandInGradScaler()
    trainer.bcp_nonfinite_in_a_row, trainer.bcp_max_nonfinite_steps = 0, 1
    iteration = trainer.bcp_iteration
    student, teacher = copy.deepcopy(trainer.network.state_dict()), copy.deepcopy(trainer.teacher.state_dict())
    conv = dict(trainer.network.named_parameters())[FIRST_CONV]
    hook = conv.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    trainer.largest_component_classes()  # decided once, with a log line of its own
    log_before = open(trainer.log_file).read()
    try:
        out = trainer.stage_two_step(*_batches(trainer, 0))
        out = trainer.stage_two_step(*_batches(trainer, 1))  # a second in a row: still no abort
    finally:
        hook.remove()
        trainer.grad_scaler = None
    assert np.isfinite(out["loss"]) and np.isfinite(out["bcp"]["bcp_loss_labeled"].item())
    assert trainer.bcp_nonfinite_in_a_row == 0 and trainer.bcp_iteration == iteration
    assert open(trainer.log_file).read() == log_before  # nothing logged: no warning naming the cases
    assert all(torch.equal(v, student[k]) for k, v in trainer.network.state_dict().items())
    assert all(torch.equal(v, teacher[k]) for k, v in trainer.teacher.state_dict().items())


def test_a_teacher_that_misses_classes_is_reported(trainer):
    seg_layer = trainer.teacher.decoder.seg_layers[-1]
    with torch.no_grad():  # a teacher that predicts background everywhere
        seg_layer.weight.zero_()
        seg_layer.bias.copy_(torch.tensor([10.0, -10.0, -10.0]))
    out = trainer.stage_two_step(*_batches(trainer, 0))
    assert out["bcp"]["bcp_pseudo_fg_fraction"].tolist() == [0.0, 0.0]
    # _batches' labels are uniform over {0, 1, 2}: each class holds about a third of the labeled voxels
    assert np.allclose(out["bcp"]["bcp_labeled_fg_fraction"], 1 / 3, atol=0.02)
    trainer.on_train_epoch_end([out])
    assert os.path.isfile(join(trainer.output_folder, "bcp_progress.png"))
    log = open(trainer.log_file).read()
    assert "the teacher's pseudo-labels hold classes [1, 2] on [0.0, 0.0] of the unlabeled voxels" in log
    assert "raise bcp_pretrain_epochs" in log
    with torch.no_grad():
        seg_layer.bias.copy_(torch.tensor([-10.0, 10.0, -10.0]))  # only class 1
    trainer.on_train_epoch_end([trainer.stage_two_step(*_batches(trainer, 1))])
    assert "hold class [2] on [0.0]" in open(trainer.log_file).read()
    # rare, not absent: judged against the labeled share (warned below a quarter of it, not at or above)
    trainer._warn_if_teacher_misses_classes([0.3, 0.05], [0.33, 0.33])
    assert "hold class [2] on [0.05] of the unlabeled voxels against [0.33]" in open(trainer.log_file).read()
    before = open(trainer.log_file).read()
    trainer._warn_if_teacher_misses_classes([0.3, 0.09], [0.33, 0.33])
    trainer._warn_if_teacher_misses_classes([0.3, 0.0], [0.33, 0.0])  # class 2 not in the labeled patches
    assert open(trainer.log_file).read() == before


def test_stage_one_goes_on_while_the_student_misses_a_class(trainer):
    trainer.bcp_teacher_initialized = False
    # default: three quarters of nnU-Net's 1000 epochs with the restart (stage 1 goes on at the restarted rate)
    assert trainer.max_pretrain_epochs() == 750
    trainer.bcp_pretrain_epochs, trainer.bcp_max_pretrain_epochs = 4, 6
    trainer.bcp_restart_lr = False  # one decay over the run
    # the rule reads the student's Dice on its labeled training patches, never nnU-Net's validation Dice
    trainer.logger.log('dice_per_class_or_region', [0.0, 0.0], 0)

    trainer.current_epoch = 3
    trainer.bcp_student_train_dice = [0.8, 0.7]
    assert not trainer.start_stage_two_now()  # before bcp_pretrain_epochs
    trainer.current_epoch = 4
    trainer.bcp_student_train_dice = [0.6, 0.0001]
    assert not trainer.start_stage_two_now()
    log = open(trainer.log_file).read()
    assert "stage 1 goes on" in log and "bcp_pretrain_min_dice=0.1 for [2]" in log
    trainer.bcp_student_train_dice = [0.6, float("nan")]  # class 2 not in the patches: nothing to judge
    assert trainer.start_stage_two_now()
    trainer.bcp_student_train_dice = [0.6, 0.3]
    assert trainer.start_stage_two_now()
    trainer.current_epoch = 6
    trainer.bcp_student_train_dice = [0.0, 0.3]
    assert trainer.start_stage_two_now()  # the cap
    assert "WARNING: stage 2 starts at bcp_max_pretrain_epochs=6" in open(trainer.log_file).read()
    trainer.current_epoch, trainer.bcp_pretrain_min_dice = 4, 0  # switched off
    assert trainer.start_stage_two_now()


def test_checkpoint_from_another_trainer_or_plan_is_refused(trainer, tmp_path):
    path = str(tmp_path / "ckpt.pth")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    other_plan = copy.deepcopy(ckpt)
    other_plan["init_args"]["configuration"] = "2d"
    torch.save(other_plan, str(tmp_path / "other_plan.pth"))
    with pytest.raises(SystemExit, match="configuration '2d', not 'nnUNetPlans', '3d_fullres'"):
        trainer.load_checkpoint(str(tmp_path / "other_plan.pth"))
    del ckpt["bcp"]
    ckpt["trainer_name"] = "nnUNetTrainer"
    torch.save(ckpt, str(tmp_path / "plain.pth"))
    with pytest.raises(SystemExit, match="written by nnUNetTrainer, not by a BCP trainer, and has no teacher; start BCP "
                                         "from it with nnUNetv2_bcp_start_from_model instead of --c"):
        trainer.load_checkpoint(str(tmp_path / "plain.pth"))


def test_bcp_settings_reach_nnunets_weights_and_biases_logger(trainer, monkeypatch):
    """With nnUNet_wandb_enabled, nnU-Net's MetaLogger holds a WandbLogger: the BCP settings go to its run config."""
    from nnunetv2.training.logging import nnunet_logger
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class FakeRun:  # what WandbLogger uses of a wandb run
        step = 0

        def __init__(self):
            self.config = {}

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            return FakeRun()

    monkeypatch.setattr(nnunet_logger, "wandb", FakeWandb)
    monkeypatch.setenv("nnUNet_wandb_enabled", "1")
    trainer.logger = nnunet_logger.MetaLogger(trainer.output_folder, resume=False)
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)  # data loaders etc.: not needed here
    trainer.on_train_start()
    config = trainer.logger.loggers[0].run.config
    assert {k: config[k] for k in ("bcp_alpha", "bcp_ema_decay", "bcp_pretrain_epochs")} == {
        "bcp_alpha": 0.5, "bcp_ema_decay": 0.99, "bcp_pretrain_epochs": trainer.pretrain_epochs()}


class _SegmentationsOnly:
    """Stands in for nnU-Net's dataset class: reference segmentations of labeled cases, (1, *spatial) like nnU-Net's."""
    def __init__(self, segmentations):
        self.segmentations = segmentations

    def __call__(self, folder, identifiers):
        self.identifiers = identifiers
        return self

    def load_case(self, identifier):
        return None, self.segmentations[identifier][None], None, {}


def test_the_largest_component_filter_is_chosen_per_class_from_the_labeled_cases(trainer, monkeypatch):
    """Class 1 forms one component in the labeled cases, class 2 (say lesions) two: "auto" filters class 1 only, and
    a pseudo-label map with two blobs of class 2 keeps both."""
    shape = tuple(trainer.configuration_manager.patch_size)
    segmentations = {}
    for case in ("a", "b", "c"):
        seg = np.zeros(shape, np.int16)
        seg[2:8, 2:8, 2:8] = 1
        seg[-6:-2, -6:-2, -6:-2] = 2
        seg[-6:-2, 2:6, -6:-2] = 2
        segmentations[case] = seg
    monkeypatch.setattr(trainer, "dataset_class", _SegmentationsOnly(segmentations))
    monkeypatch.setattr(trainer, "labeled_training_identifiers", ["a", "b", "c"], raising=False)
    monkeypatch.setattr(trainer, "bcp_largest_component", "auto")
    monkeypatch.setattr(trainer, "bcp_largest_component_classes", None)
    assert trainer.largest_component_classes() == [1]
    assert trainer.bcp_settings()["bcp_largest_component_classes"] == [1]
    assert "largest component for classes [1] of [1, 2]" in open(trainer.log_file).read()
    teacher_output = torch.from_numpy(segmentations["a"]).long()
    teacher_output[0, 0, 0] = 1  # a stray voxel of the filtered class
    logits = torch.nn.functional.one_hot(teacher_output, 3).permute(3, 0, 1, 2)[None].float() * 10
    with torch.no_grad():
        monkeypatch.setattr(trainer, "teacher_forward", lambda x: logits)
        labels = trainer.make_pseudo_labels(torch.zeros(1, 1, *shape))
    assert labels[0, 0, 0, 0, 0] == 0 and (labels == 1).sum() == 6 ** 3
    assert (labels == 2).sum() == 2 * 4 ** 3  # both instances of class 2 kept

    for setting, chosen in ((True, [1, 2]), (False, []), ([2], [2])):
        monkeypatch.setattr(trainer, "bcp_largest_component", setting)
        monkeypatch.setattr(trainer, "bcp_largest_component_classes", None)
        assert trainer.largest_component_classes() == chosen
    monkeypatch.setattr(trainer, "bcp_largest_component", [3])
    monkeypatch.setattr(trainer, "bcp_largest_component_classes", None)
    with pytest.raises(SystemExit, match=r"bcp_largest_component=\[3\]: expected 'auto', True, False or a list of "
                                         r"classes among \[1, 2\]"):
        trainer.largest_component_classes()
