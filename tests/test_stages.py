"""Stage lengths follow the schedule the user sets, the stage-1 rule reads only labels training has, and the
optional supervised term of stage 2."""
import copy

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from test_trainer import _batches, trainer  # noqa: F401 (fixture)


def _new(trainer_class, synthetic_3d):
    plans = dict(load_json(join(synthetic_3d["preprocessed"], "nnUNetPlans.json")), continue_training=False)
    dataset_json = load_json(join(synthetic_3d["preprocessed"], "dataset.json"))
    return trainer_class(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def test_stage_lengths_follow_num_epochs_set_after_init(synthetic_3d):
    from nnunetv2_bcp import nnUNetTrainerBCP
    from nnunetv2_bcp.training.variants import nnUNetTrainerBCP_5epochs

    class Shorter(nnUNetTrainerBCP):  # nnU-Net's way to shorten training (as its nnUNetTrainer_5epochs does)
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 100

    shorter = _new(Shorter, synthetic_3d)
    assert (shorter.pretrain_epochs(), shorter.max_pretrain_epochs()) == (50, 75)
    settings = shorter.bcp_settings()
    assert settings["bcp_pretrain_epochs"] == 50 and settings["bcp_max_pretrain_epochs"] == 75
    assert _new(nnUNetTrainerBCP_5epochs, synthetic_3d).pretrain_epochs() == 2
    shorter.bcp_pretrain_epochs = 7  # set by the user: kept
    assert shorter.pretrain_epochs() == 7 and shorter.max_pretrain_epochs() == 75
    shorter.bcp_restart_lr = False  # one decay: stage 1 goes on at most to half of it
    assert shorter.max_pretrain_epochs() == 50
    shorter.bcp_max_pretrain_epochs = 60
    assert shorter.max_pretrain_epochs() == 60


def test_a_stage_one_as_long_as_the_schedule_is_refused_before_training(synthetic_3d):
    from nnunetv2_bcp import nnUNetTrainerBCP
    t = _new(nnUNetTrainerBCP, synthetic_3d)
    t.num_epochs, t.bcp_pretrain_epochs = 10, 10
    with pytest.raises(SystemExit, match="bcp_pretrain_epochs=10 is not below num_epochs=10, so stage 2"):
        t.on_train_start()
    assert t.dataloader_train is None  # refused before any work
    t.bcp_pretrain_epochs = 9
    t.check_stage_lengths()
    t.bcp_max_pretrain_epochs = 10  # stage 1 goes on while the student misses a class: at most until here
    with pytest.raises(SystemExit, match="bcp_max_pretrain_epochs=10 is not below num_epochs=10"):
        t.check_stage_lengths()
    t.bcp_max_pretrain_epochs, t.bcp_pretrain_epochs, t.num_epochs = None, None, 1  # nnUNetTrainerBCP_1epoch
    assert (t.pretrain_epochs(), t.max_pretrain_epochs()) == (0, 0)  # its one epoch is stage 2's
    t.check_stage_lengths()
    t.bcp_teacher_initialized = True  # started from a model in stage 2: stage 1 is not run at all
    t.bcp_pretrain_epochs = 10
    t.check_stage_lengths()


class _Batches:
    """A stand-in for nnU-Net's training loader: the same labeled batch over and over."""

    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        return copy.deepcopy(self.batch)


def test_stage_one_rule_judges_the_student_on_labeled_training_patches(trainer, tmp_path):
    trainer.bcp_teacher_initialized = False
    trainer.bcp_restart_lr = False  # one decay over the run: stage 1 can go on
    trainer.bcp_pretrain_epochs, trainer.bcp_max_pretrain_epochs = 1, 10
    seg_layer = trainer.network.decoder.seg_layers[-1]
    with torch.no_grad():  # a student that predicts class 1 everywhere: class 2 is missed
        seg_layer.weight.zero_()
        seg_layer.bias.copy_(torch.tensor([-10.0, 10.0, -10.0]))
    labeled, _ = _batches(trainer, 0)
    trainer.dataloader_train = _Batches(labeled)
    trainer.num_val_iterations_per_epoch = 2
    # nnU-Net's validation Dice is not what the rule reads: a perfect one must not start stage 2
    trainer.logger.log('dice_per_class_or_region', [1.0, 1.0], 0)
    trainer.current_epoch = 0
    trainer.on_train_epoch_end([{'loss': np.array(1.0)}])
    dice = trainer.bcp_student_train_dice
    target = labeled["target"][0]
    assert np.isclose(dice[0], 2 * (target == 1).sum().item() / ((target == 1).sum().item() + target.numel()))
    assert dice[1] == 0
    assert "the student's Dice per class on labeled training patches" in open(trainer.log_file).read()
    trainer.current_epoch = 1
    assert not trainer.start_stage_two_now()
    assert "labeled training patches is [" in open(trainer.log_file).read()
    # kept in the checkpoint, so that --c judges the same way
    path = str(tmp_path / "ckpt.pth")
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["bcp"]["student_train_dice"] == dice
    trainer.bcp_student_train_dice = [0.8, 0.7]  # once the student has every class
    assert trainer.start_stage_two_now()


def test_supervised_term_adds_nnunets_loss_on_the_unmixed_labeled_patches(trainer):
    labeled, unlabeled = _batches(trainer, 3)
    state = copy.deepcopy((trainer.network.state_dict(), trainer.optimizer.state_dict(),
                           trainer.teacher.state_dict()))
    trainer.bcp_labeled_loss_weight = 0.0  # the paper's loss alone
    torch.manual_seed(0)
    without = trainer.stage_two_step(labeled, unlabeled)
    trainer.network.load_state_dict(state[0])
    trainer.optimizer.load_state_dict(state[1])
    trainer.teacher.load_state_dict(state[2])
    with torch.no_grad():
        expected = trainer.loss(trainer.network(labeled["data"]), labeled["target"]).item()
    trainer.bcp_labeled_loss_weight = 0.5
    torch.manual_seed(0)  # the same box and directions
    with_term = trainer.stage_two_step(labeled, unlabeled)
    assert np.isclose(with_term["bcp"]["bcp_loss_labeled"], without["bcp"]["bcp_loss_labeled"], rtol=1e-4)
    assert np.isclose(with_term["loss"] - without["loss"], 0.5 * expected, rtol=1e-3, atol=1e-5)
    assert trainer.bcp_settings()["bcp_labeled_loss_weight"] == 0.5


@pytest.mark.parametrize("name, weight", [("nnUNetTrainerBCP_referenceLoss", 0.0), ("nnUNetTrainerBCP", 1.0)])
def test_the_supervised_term_variants_are_found_by_name_through_the_trainer_folder(synthetic_3d, monkeypatch, name,
                                                                                   weight):
    """``nnUNetv2_train … -tr nnUNetTrainerBCP_referenceLoss`` (the paper's loss alone) finds it as nnU-Net finds any
    trainer; the supervised term is on by default."""
    import nnunetv2_bcp
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    monkeypatch.setenv("nnUNet_extTrainer", nnunetv2_bcp.ext_trainer_dir())
    found = recursive_find_trainer_class_by_name(name)
    variant = _new(found, synthetic_3d)
    assert variant.bcp_labeled_loss_weight == weight and variant.bcp_settings()["bcp_labeled_loss_weight"] == weight


def test_the_supervised_term_passes_on_its_own_with_the_gradient_of_one_pass_on_both(trainer, monkeypatch):
    """The labeled patches pass the student after the mixed patches' backward (each forward pass holds one batch's
    activations, not two): the gradient equals that of one pass on mixed and labeled patches together."""
    from nnunetv2_bcp.bcp import bcp_total, downsample_mask, labeled_origin, mix_by_origin
    labeled, unlabeled = _batches(trainer, 4)
    monkeypatch.setattr(trainer, "bcp_labeled_loss_weight", 1.0)
    inward, box = torch.tensor([True, False]), trainer._random_mask(2)
    monkeypatch.setattr(trainer, "draw_directions", lambda batch_size: inward)
    monkeypatch.setattr(trainer, "_random_mask", lambda batch_size: box)
    teacher = copy.deepcopy(trainer.teacher.state_dict())
    step_grads, batch_sizes = {}, []
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: step_grads.update(
        {n: p.grad.clone() for n, p in trainer.network.named_parameters() if p.grad is not None}))
    hook = trainer.network.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        trainer.stage_two_step(labeled, unlabeled)
    finally:
        hook.remove()
    assert batch_sizes == [2, 2]  # mixed, then labeled: never both at once
    trainer.teacher.load_state_dict(teacher)  # the step's EMA moved it; the weights did not move (step recorded only)

    trainer.optimizer.zero_grad(set_to_none=True)
    pseudo = trainer.make_pseudo_labels(unlabeled["data"])
    targets = labeled["target"]
    from_labeled = labeled_origin(box, inward)
    masks = [downsample_mask(from_labeled, t.shape[2:]) for t in targets]
    mixed = mix_by_origin(labeled["data"], unlabeled["data"], from_labeled)
    outputs = trainer.network(torch.cat([mixed, labeled["data"]]))
    mixed_targets = [mix_by_origin(t, downsample_mask(pseudo, t.shape[2:]), m) for t, m in zip(targets, masks)]
    terms = trainer.bcp_loss([o[:2] for o in outputs], mixed_targets, masks, [inward] * len(masks))
    (bcp_total(terms, trainer.bcp_alpha) + trainer.loss([o[2:] for o in outputs], targets)).backward()
    torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
    one_pass = {n: p.grad for n, p in trainer.network.named_parameters() if p.grad is not None}
    assert one_pass.keys() == step_grads.keys()
    for name, grad in one_pass.items():
        assert torch.allclose(step_grads[name], grad, rtol=1e-4, atol=1e-7), name
    trainer.optimizer.zero_grad(set_to_none=True)


def test_the_staged_schedule_is_nnunets_poly_decay_restarted_at_stage_two():
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2_bcp.training.schedule import StagedPolyLRScheduler, TrainingStages

    def lrs(scheduler, epochs):
        out = []
        for e in epochs:
            scheduler.step(e)
            out.append(scheduler.optimizer.param_groups[0]["lr"])
        return out

    def sgd():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)

    stages = TrainingStages(restart=True, stage_one_epochs=4, restart_epoch=None)
    staged = StagedPolyLRScheduler(sgd(), 0.01, 10, lambda: stages)
    # stage 1: nnU-Net's decay over its 4 epochs, then its last value while stage 1 goes on
    assert np.allclose(lrs(staged, range(4)), lrs(PolyLRScheduler(sgd(), 0.01, 4), range(4)))
    assert np.isclose(lrs(staged, [5])[0], lrs(PolyLRScheduler(sgd(), 0.01, 4), [3])[0])
    stages = stages._replace(restart_epoch=6)  # after the restart: nnU-Net's decay again, over the 4 epochs left
    assert np.allclose(lrs(staged, range(6, 10)), lrs(PolyLRScheduler(sgd(), 0.01, 4), range(4)))
    assert lrs(staged, [6]) == [0.01]
    plain = StagedPolyLRScheduler(sgd(), 0.01, 10, lambda: TrainingStages(False, 4, 6))
    assert np.allclose(lrs(plain, range(10)), lrs(PolyLRScheduler(sgd(), 0.01, 10), range(10)))


def test_the_default_stage_one_is_nnunets_own_step_and_the_papers_is_a_trainer(trainer, synthetic_3d, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_bcp.training.variant_stage_one import nnUNetTrainerBCP_paperStageOne
    seen = []
    monkeypatch.setattr(nnUNetTrainer, "train_step", lambda self, batch: seen.append(batch) or {"loss": np.array(0.)})
    trainer.bcp_teacher_initialized = False
    labeled, _ = _batches(trainer, 0)
    assert trainer.bcp_stage_one == "nnunet"
    trainer.train_step(labeled)
    assert seen[-1] is labeled  # not mixed
    trainer.bcp_stage_one = "copy_paste"
    trainer.train_step(labeled)
    assert not torch.equal(seen[-1]["data"], labeled["data"])  # the labeled patches mixed with each other
    paper = _new(nnUNetTrainerBCP_paperStageOne, synthetic_3d)
    assert (paper.bcp_stage_one, paper.pretrain_epochs(), paper.max_pretrain_epochs()) == ("copy_paste", 200, 500)
    paper.bcp_stage_one = "copy-paste"
    with pytest.raises(SystemExit, match="bcp_stage_one='copy-paste' is none of"):
        paper.on_train_start()


def test_stage_two_restarts_the_learning_rate_with_fresh_momentum_and_a_resume_keeps_its_schedule(synthetic_3d,
                                                                                                  tmp_path):
    from nnunetv2_bcp import nnUNetTrainerBCP

    class TenEpochs(nnUNetTrainerBCP):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.bcp_pretrain_epochs, self.bcp_pretrain_min_dice = 10, 4, 0

    def lr(t):
        return t.optimizer.param_groups[0]["lr"]

    t = _new(TenEpochs, synthetic_3d)
    t.initialize()
    labeled, _ = _batches(t, 0)
    t.current_epoch = 3
    t.on_train_epoch_start()
    assert np.isclose(lr(t), 0.01 * (1 - 3 / 4) ** 0.9) and not t.in_stage_two()
    t.train_step(labeled)  # nnU-Net's step: momentum buffers
    assert t.optimizer.state
    t.current_epoch = 4
    t.on_train_epoch_start()
    assert t.in_stage_two() and t.bcp_stage_two_start_epoch == 4
    assert lr(t) == t.initial_lr and not t.optimizer.state
    for a, b in zip(t.teacher.state_dict().values(), t.network.state_dict().values()):
        assert torch.equal(a, b)
    assert "BCP stage 2 from epoch 4: teacher initialised from the student; the learning rate restarts" in \
        open(t.log_file).read()
    t.current_epoch = 6
    path = str(tmp_path / "checkpoint_latest.pth")
    t.save_checkpoint(path)
    resumed = _new(TenEpochs, synthetic_3d)
    resumed.load_checkpoint(path)  # --c: nnU-Net continues with epoch 7, the schedule asks the restored stages
    resumed.on_train_epoch_start()
    assert resumed.current_epoch == 7 and np.isclose(lr(resumed), 0.01 * (1 - 3 / 6) ** 0.9)

    without = _new(TenEpochs, synthetic_3d)  # one decay over the run: the paper's schedule
    without.bcp_restart_lr = False
    without.initialize()
    without.train_step(labeled)
    without.current_epoch = 4
    without.on_train_epoch_start()
    assert without.in_stage_two() and np.isclose(lr(without), 0.01 * (1 - 4 / 10) ** 0.9) and without.optimizer.state


def test_with_a_restart_a_student_that_misses_a_class_goes_on_at_the_restarted_learning_rate_until_it_sees_it(
        synthetic_3d, tmp_path):
    from nnunetv2_bcp import nnUNetTrainerBCP

    class TenEpochs(nnUNetTrainerBCP):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.bcp_pretrain_epochs = 10, 4

    def lr(t):
        return t.optimizer.param_groups[0]["lr"]

    t = _new(TenEpochs, synthetic_3d)
    t.initialize()
    assert t.restarts_lr() and t.max_pretrain_epochs() == 8
    labeled, _ = _batches(t, 0)
    t.train_step(labeled)  # momentum buffers
    t.bcp_student_train_dice = [0.8, 0.0]  # measured after epoch 3: class 2 missed
    t.current_epoch = 4
    t.on_train_epoch_start()
    assert not t.in_stage_two() and t.bcp_lr_restart_epoch == 4  # no teacher yet, the learning rate restarted
    assert lr(t) == t.initial_lr and not t.optimizer.state
    assert "stage 1 goes on with the learning rate restarted at epoch 4" in open(t.log_file).read()
    t.train_step(labeled)
    path = str(tmp_path / "checkpoint_latest.pth")
    t.save_checkpoint(path)  # --c between the restart and the teacher keeps the restart
    resumed = _new(TenEpochs, synthetic_3d)
    resumed.load_checkpoint(path)
    assert resumed.bcp_lr_restart_epoch == 4 and resumed.bcp_student_train_dice == [0.8, 0.0]
    resumed.on_train_epoch_start()  # epoch 5, class 2 still missed
    assert not resumed.in_stage_two() and np.isclose(lr(resumed), 0.01 * (1 - 1 / 6) ** 0.9)
    assert resumed.optimizer.state  # not restarted a second time
    resumed.bcp_student_train_dice = [0.8, 0.5]  # the student sees every class
    resumed.current_epoch = 6
    resumed.on_train_epoch_start()
    assert resumed.in_stage_two() and resumed.bcp_stage_two_start_epoch == 6
    assert np.isclose(lr(resumed), 0.01 * (1 - 2 / 6) ** 0.9)  # the decay from the restart goes on
    for a, b in zip(resumed.teacher.state_dict().values(), resumed.network.state_dict().values()):
        assert torch.equal(a, b)
    assert "BCP stage 2 from epoch 6: teacher initialised from the student (the learning rate restarted at epoch 4)" \
        in open(resumed.log_file).read()

    capped = _new(TenEpochs, synthetic_3d)  # a class never learned: the teacher is made at the cap, with a warning
    capped.initialize()
    capped.bcp_student_train_dice = [0.8, 0.0]
    for epoch in range(4, 9):
        capped.current_epoch = epoch
        capped.on_train_epoch_start()
    assert capped.bcp_lr_restart_epoch == 4 and capped.bcp_stage_two_start_epoch == 8
    assert "WARNING: stage 2 starts at bcp_max_pretrain_epochs=8" in open(capped.log_file).read()


def test_the_staged_schedule_never_exceeds_the_initial_learning_rate_without_a_stage_one():
    from nnunetv2_bcp.training.schedule import StagedPolyLRScheduler, TrainingStages
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    stages = TrainingStages(True, 0, None)
    scheduler = StagedPolyLRScheduler(optimizer, 0.01, 10, lambda: stages)  # steps once when made
    rates = [optimizer.param_groups[0]["lr"]]
    stages = TrainingStages(True, 0, 0)  # the teacher made at once: the restart at epoch 0
    for epoch in range(10):
        scheduler.step(epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[:2] == [0.01, 0.01] and all(later < earlier for earlier, later in zip(rates[1:], rates[2:]))


def test_checkpoint_best_holds_a_stage_two_model_from_the_first_stage_two_epoch(synthetic_3d):
    """nnU-Net writes checkpoint_best.pth when the EMA pseudo Dice beats its best so far: stage 1's best (a
    labeled-only model) must not stay there while stage 2, after the learning rate's restart, is still below it."""
    from nnunetv2_bcp import nnUNetTrainerBCP

    class TenEpochs(nnUNetTrainerBCP):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.bcp_pretrain_epochs, self.bcp_pretrain_min_dice = 10, 4, 0

    t = _new(TenEpochs, synthetic_3d)
    t.initialize()
    t.logger.plot_progress_png = lambda folder: None

    def epoch(dice):
        t.on_train_epoch_start()
        for key, value in (("epoch_start_timestamps", 0.0), ("train_losses", 0.0), ("val_losses", 0.0),
                           ("dice_per_class_or_region", [dice, dice]), ("mean_fg_dice", dice)):
            t.logger.log(key, value, t.current_epoch)
        t.on_epoch_end()
        return torch.load(join(t.output_folder, "checkpoint_best.pth"), weights_only=False)

    for _ in range(4):
        assert not epoch(0.9)["bcp"]["teacher_initialized"]  # stage 1's best
    best = epoch(0.1)  # stage 2's first epoch, far below stage 1's
    assert best["bcp"]["teacher_initialized"] and best["current_epoch"] == 5  # nnU-Net stores the epoch to go on with
    assert epoch(0.05)["current_epoch"] == 5  # then the best of stage 2, as nnU-Net picks it
