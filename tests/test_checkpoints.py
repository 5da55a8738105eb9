"""BCP checkpoints: nnU-Net's entries plus the teacher, one atomic write per save, one read per load, and starting a
training from an existing nnU-Net model (nnUNetv2_bcp_start_from_model)."""
import os

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from conftest import run_cli
from test_trainer import FIRST_CONV, _batches, ext_trainer_env, trainer  # noqa: F401 (fixtures)
from nnunetv2_bcp.training.checkpoint import remove_stale_checkpoint_temporaries


def _plans(trainer) -> dict:
    """Plans for another trainer of the same configuration (nnU-Net pops 'continue_training' from the dict)."""
    return dict(trainer.plans_manager.plans, continue_training=False)


def _counting(monkeypatch, name):
    calls = []
    original = getattr(torch, name)

    def counted(*args, **kwargs):
        calls.append(args[1] if name == "save" else args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, name, counted)
    return calls


def test_checkpoint_holds_nnunets_entries_and_the_teacher_in_one_write(trainer, tmp_path, monkeypatch):
    trainer.stage_two_step(*_batches(trainer, 0))
    plain = str(tmp_path / "plain.pth")
    nnUNetTrainer.save_checkpoint(trainer, plain)  # what nnU-Net itself writes for this trainer
    writes = _counting(monkeypatch, "save")
    path = str(tmp_path / "bcp.pth")
    trainer.save_checkpoint(path)
    files_written = [w for w in writes if isinstance(w, str)]  # nnU-Net's own dict is serialised into memory first
    assert files_written == [path + ".tmp"] and sorted(os.listdir(tmp_path)) == ["bcp.pth", "plain.pth"]
    ours, theirs = (torch.load(p, weights_only=False) for p in (path, plain))
    assert set(ours) == set(theirs) | {"bcp"}  # a key added by a new nnU-Net release shows up here
    for key in ("current_epoch", "_best_ema", "trainer_name", "init_args", "logging"):
        assert ours[key] == theirs[key], key
    assert torch.equal(ours["network_weights"][FIRST_CONV], theirs["network_weights"][FIRST_CONV])
    assert torch.equal(ours["bcp"]["teacher_weights"][FIRST_CONV], trainer.teacher.state_dict()[FIRST_CONV])
    assert ours["bcp"]["teacher_initialized"] and ours["bcp"]["iteration"] == trainer.bcp_iteration == 1


def test_a_failed_write_keeps_the_previous_checkpoint_and_resume_uses_it(trainer, tmp_path, monkeypatch):
    from nnunetv2_bcp import nnUNetTrainerBCP
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.current_epoch = 7
    trainer.save_checkpoint(path)
    saved_teacher = trainer.teacher.state_dict()[FIRST_CONV].clone()
    trainer.stage_two_step(*_batches(trainer, 1))  # the teacher moves on
    trainer.current_epoch = 8

    original = torch.save

    def dies_mid_write(obj, f, *args, **kwargs):
        if not isinstance(f, str):  # nnU-Net's dict into memory
            return original(obj, f, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    monkeypatch.setattr(torch, "save", original)
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]  # no temporary left behind

    # --c: a fresh trainer resumes from the previous, intact checkpoint, with its teacher
    resumed = nnUNetTrainerBCP(_plans(trainer), "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))
    resumed.load_checkpoint(path)
    assert resumed.current_epoch == 8 and resumed.in_stage_two()
    assert torch.equal(resumed.teacher.state_dict()[FIRST_CONV], saved_teacher)
    assert not torch.equal(resumed.teacher.state_dict()[FIRST_CONV], trainer.teacher.state_dict()[FIRST_CONV])


def test_a_resumed_run_keeps_the_stage_two_settings_it_started_with(trainer, tmp_path):
    """--c after the plugin's defaults changed (here: the supervised term, off when the run began) continues as the
    run began and says so; a checkpoint from before a setting existed continues with the value it had then."""
    from nnunetv2_bcp import nnUNetTrainerBCP
    trainer.bcp_labeled_loss_weight, trainer.bcp_alpha = 0.0, 0.3
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    resumed = nnUNetTrainerBCP(_plans(trainer), "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))
    assert (resumed.bcp_labeled_loss_weight, resumed.bcp_alpha) == (1.0, 0.5)  # today's defaults
    resumed.load_checkpoint(path)
    assert (resumed.bcp_labeled_loss_weight, resumed.bcp_alpha) == (0.0, 0.3)
    assert resumed.bcp_settings()["bcp_labeled_loss_weight"] == 0.0
    log = open(resumed.log_file).read()
    assert "continuing with the settings this run started with" in log
    assert "bcp_labeled_loss_weight = 0.0 (this trainer's: 1.0)" in log and "bcp_alpha = 0.3" in log

    older = torch.load(path, weights_only=False)
    del older["bcp"]["settings"]["bcp_labeled_loss_weight"]  # written before the supervised term existed
    older_path = str(tmp_path / "older.pth")
    torch.save(older, older_path)
    again = nnUNetTrainerBCP(_plans(trainer), "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))
    again.load_checkpoint(older_path)
    assert (again.bcp_labeled_loss_weight, again.bcp_alpha) == (0.0, 0.3)


def test_a_resumed_run_with_the_settings_it_started_with_says_nothing_about_them(trainer, tmp_path):
    """The checkpoint records stage 1's length as resolved (half of num_epochs when unset): a resume by the same
    trainer is not told that its settings differ, and keeps that length."""
    from nnunetv2_bcp import nnUNetTrainerBCP
    trainer.bcp_stage_two_start_epoch = trainer.current_epoch  # as begin_stage_two records it
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    resumed = nnUNetTrainerBCP(_plans(trainer), "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))
    assert resumed.bcp_pretrain_epochs is None
    logged = []  # not the log file: trainers of other tests made in the same second share it
    resumed.print_to_log_file = lambda *args, **kwargs: logged.append(" ".join(map(str, args)))
    resumed.load_checkpoint(path)
    assert not [line for line in logged if "continuing with the settings" in line]
    assert resumed.pretrain_epochs() == trainer.pretrain_epochs()
    assert resumed.bcp_settings() == trainer.bcp_settings()


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / "checkpoint_latest.pth.tmp").write_bytes(b"partial")
    (tmp_path / "checkpoint_best.pth").write_bytes(b"kept")
    assert remove_stale_checkpoint_temporaries(str(tmp_path)) == [str(tmp_path / "checkpoint_latest.pth.tmp")]
    assert os.listdir(tmp_path) == ["checkpoint_best.pth"]


def _plain_model(trainer, tmp_path, **changed_init_args):
    """An nnU-Net (labeled-only) checkpoint of the same plans, with weights of its own."""
    plain = nnUNetTrainer(_plans(trainer), "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))
    plain.initialize()
    with torch.no_grad():
        for p in plain.network.parameters():
            p.add_(torch.randn_like(p))
    plain.my_init_kwargs.update(changed_init_args)
    path = str(tmp_path / f"model{len(os.listdir(tmp_path))}.pth")
    plain.save_checkpoint(path)
    return plain, path


def test_bcp_starts_in_stage_two_from_all_weights_of_an_nnunet_model(trainer, tmp_path, ext_trainer_env):
    from nnunetv2_bcp import nnUNetTrainerBCP
    plain, model = _plain_model(trainer, tmp_path)
    fold = "3"  # an output folder of its own
    run_cli("nnUNetv2_bcp_start_from_model", "990", "3d_fullres", fold, "-tr", "nnUNetTrainerBCP", "-m", model,
            env=ext_trainer_env)
    started = nnUNetTrainerBCP(_plans(trainer), "3d_fullres", int(fold), trainer.dataset_json, torch.device("cpu"))
    start = join(started.output_folder, "checkpoint_latest.pth")
    started.load_checkpoint(start)  # what nnUNetv2_train --c does
    assert started.current_epoch == 0 and started.in_stage_two()
    for name, value in plain.network.state_dict().items():  # every weight, segmentation heads included
        assert torch.equal(started.network.state_dict()[name], value), name
        assert torch.equal(started.teacher.state_dict()[name], value), name
    assert any("seg_layers" in name for name in plain.network.state_dict())
    started.check_not_restarting_a_started_model()  # continued with --c: it goes on
    # without --c nnU-Net would train from random weights over the starting checkpoint: refused before any work
    fresh = nnUNetTrainerBCP(_plans(trainer), "3d_fullres", int(fold), trainer.dataset_json, torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"prepared by nnUNetv2_bcp_start_from_model .* nnUNetv2_train \.\.\. --c"):
        fresh.on_train_start()
    assert torch.load(start, weights_only=False)["current_epoch"] == 0
    # (in this process from here: the command is the function below behind nnU-Net's trainer lookup)
    from nnunetv2_bcp.training.start_from_model import start_from_model
    from nnunetv2_bcp.training.nnUNetTrainerLabelSubset import nnUNetTrainerLabelSubset
    # it refuses to overwrite a training that has begun
    again = nnUNetTrainerBCP(_plans(trainer), "3d_fullres", int(fold), trainer.dataset_json, torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"already holds \['checkpoint_latest.pth'\]"):
        start_from_model(again, model)
    # the labeled-only control continues the same way with a plain nnU-Net trainer
    start_from_model(nnUNetTrainerLabelSubset(_plans(trainer), "3d_fullres", int(fold), trainer.dataset_json,
                                              torch.device("cpu")), model)
    labeled_only = torch.load(join(os.environ["nnUNet_results"], "Dataset990_BCPSynthetic",
                                   "nnUNetTrainerLabelSubset__nnUNetPlans__3d_fullres", f"fold_{fold}",
                                   "checkpoint_latest.pth"), weights_only=False)
    assert labeled_only["current_epoch"] == 0 and "bcp" not in labeled_only
    assert torch.equal(labeled_only["network_weights"][FIRST_CONV], plain.network.state_dict()[FIRST_CONV])


@pytest.mark.parametrize("change,message", [
    ({"configuration": "2d"}, "configuration '2d', not 'nnUNetPlans', '3d_fullres'"),
    ("labels", "labels {'background': 0, 'a': 1} differ from this dataset's"),
])
def test_a_model_of_other_plans_or_labels_is_refused(trainer, tmp_path, change, message):
    from nnunetv2_bcp.training.start_from_model import start_from_model
    if change == "labels":
        dataset_json = dict(trainer.dataset_json, labels={"background": 0, "a": 1})
        _, model = _plain_model(trainer, tmp_path, dataset_json=dataset_json)
    else:
        _, model = _plain_model(trainer, tmp_path, **change)
    fresh = type(trainer)(_plans(trainer), "3d_fullres", 4, trainer.dataset_json, torch.device("cpu"))
    with pytest.raises(SystemExit, match="cannot start from .*" + message.replace("(", r"\(").replace("{", r"\{")):
        start_from_model(fresh, model)
    assert not os.path.isdir(fresh.output_folder) or not [f for f in os.listdir(fresh.output_folder)
                                                          if f.startswith("checkpoint")]


def test_a_checkpoint_without_teacher_points_to_the_start_command(trainer, tmp_path):
    _, model = _plain_model(trainer, tmp_path)
    with pytest.raises(SystemExit, match="not by a BCP trainer.*nnUNetv2_bcp_start_from_model"):
        trainer.load_checkpoint(model)


class _RunsACommand:
    """What a hostile checkpoint can carry: unpickling it calls os.system."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_model_that_would_run_code_when_loaded_is_refused_unless_allowed(trainer, tmp_path):
    from nnunetv2_bcp.training.start_from_model import start_from_model
    plain, model = _plain_model(trainer, tmp_path)
    hostile = torch.load(model, weights_only=False)
    marker = tmp_path / "the_command_ran"
    hostile["logging"]["note"] = _RunsACommand(marker)
    hostile_path = str(tmp_path / "hostile.pth")
    torch.save(hostile, hostile_path)
    fresh = type(trainer)(_plans(trainer), "3d_fullres", 2, trainer.dataset_json, torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"hostile.pth holds objects other than weights and numbers \(posix.system\)"
                                         r".*--allow_pickle"):
        start_from_model(fresh, hostile_path)
    assert not marker.exists()
    start_from_model(fresh, hostile_path, allow_pickle=True)  # the user vouches for it: loaded as before
    assert marker.exists()


def test_no_torch_function_is_swapped_while_nnunet_saves_or_loads(trainer, tmp_path, monkeypatch):
    """A subclass that loads its own file with torch.load in initialize() (which nnU-Net's load_checkpoint calls
    under --c) gets that file, not the BCP checkpoint; torch.save is torch.save while nnU-Net's save runs."""
    from nnunetv2_bcp import nnUNetTrainerBCP
    own_file = str(tmp_path / "pretrained_extra.pt")
    torch.save({"mine": torch.ones(2)}, own_file)

    class LoadsItsOwnFileInInitialize(nnUNetTrainerBCP):
        def initialize(self):
            self.own = torch.load(own_file, weights_only=True)
            super().initialize()

    path = str(tmp_path / "checkpoint_latest.pth")
    real_save = torch.save
    during_save = []
    get_checkpoint = trainer.logger.get_checkpoint  # called inside nnU-Net's save_checkpoint
    monkeypatch.setattr(trainer.logger, "get_checkpoint", lambda: during_save.append(torch.save) or get_checkpoint())
    trainer.save_checkpoint(path)
    assert during_save == [real_save]
    resumed = LoadsItsOwnFileInInitialize(_plans(trainer), "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))
    resumed.load_checkpoint(path)  # nnU-Net initialises the trainer inside its load_checkpoint
    assert set(resumed.own) == {"mine"}
    assert torch.equal(resumed.teacher.state_dict()[FIRST_CONV], trainer.teacher.state_dict()[FIRST_CONV])


def test_a_file_that_is_not_a_checkpoint_is_named_not_a_traceback(trainer, tmp_path):
    from nnunetv2_bcp.training.start_from_model import start_from_model
    _, model = _plain_model(trainer, tmp_path)
    text = tmp_path / "notes.pth"
    text.write_text("epoch 10: dice 0.8\n")
    cut_short = tmp_path / "half_copied.pth"
    cut_short.write_bytes(open(model, "rb").read()[:4096])
    fresh = type(trainer)(_plans(trainer), "3d_fullres", 3, trainer.dataset_json, torch.device("cpu"))
    fresh.output_folder = str(tmp_path / "fold_3")  # no checkpoint of another test there
    for path in (text, cut_short):
        for allow_pickle in (False, True):
            with pytest.raises(SystemExit, match=f"{path.name} is not a readable PyTorch checkpoint"):
                start_from_model(fresh, str(path), allow_pickle)
        with pytest.raises(SystemExit, match=f"{path.name} is not a readable PyTorch checkpoint"):
            fresh.load_checkpoint(str(path))  # --c on a damaged checkpoint_latest.pth


def test_a_label_subset_run_resumes_where_torch_cannot_load_weights_only(trainer, tmp_path, monkeypatch):
    """torch before 2.5 has no safe_globals: nnUNetTrainerLabelSubset's --c reads its own checkpoint as nnU-Net
    does, so it still resumes."""
    from nnunetv2_bcp.training.nnUNetTrainerLabelSubset import nnUNetTrainerLabelSubset
    t = nnUNetTrainerLabelSubset(_plans(trainer), "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))
    t.initialize()
    path = str(tmp_path / "checkpoint_latest.pth")
    t.save_checkpoint(path)
    monkeypatch.delattr(torch.serialization, "safe_globals")
    resumed = nnUNetTrainerLabelSubset(_plans(trainer), "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))
    resumed.load_checkpoint(path)
    assert resumed.label_subset_of_checkpoint == t.label_subset_in_use


def test_a_resumed_run_keeps_the_largest_component_classes_it_decided_without_reading_labels_again(trainer, tmp_path,
                                                                                                   monkeypatch):
    from nnunetv2_bcp import nnUNetTrainerBCP
    trainer.bcp_largest_component_classes = [2]  # what "auto" decided at the start
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    monkeypatch.setattr(nnUNetTrainerBCP, "_single_component_classes",
                        lambda self, classes: pytest.fail("the reference labels were read again"))
    resumed = nnUNetTrainerBCP(_plans(trainer), "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))
    logged = []
    resumed.print_to_log_file = lambda *args, **kwargs: logged.append(" ".join(map(str, args)))
    resumed.load_checkpoint(path)
    assert resumed.largest_component_classes() == [2]
    assert any("largest component for classes [2] (as decided when this run started" in line for line in logged)
