"""nnUNetTrainerBCP: Bidirectional Copy-Paste inside nnU-Net's training loop (Bai et al., CVPR 2023).

A thin orchestration of :mod:`nnunetv2_bcp.bcp` over nnU-Net's hooks. Everything nnU-Net does (planning,
augmentation, deep supervision, validation, checkpoints, inference) stays nnU-Net's; this class adds the
unlabeled stream, the EMA teacher, the copy-paste mixing and the α-weighted loss.
"""
import copy
from typing import List, Optional, Tuple

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, save_json
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunetv2_bcp.bcp import (BCPLoss, bcp_total, copy_paste, downsample_mask, ema_update_, inward_directions,
                              is_compiled, keep_largest_component, labeled_origin, labeled_partner, mix_by_origin,
                              pseudo_labels, random_box_mask, single_component_share, unwrap_network)
from nnunetv2_bcp.training.diagnostics import (LOW_PSEUDO_LABEL_SHARE, classes_below_share, epoch_figures,
                                               record_progress, skipped_step_figures, step_figures)
from nnunetv2_bcp.training.checkpoint import (UnreadableCheckpointError, incompatibility, load_checkpoint,
                                              remove_stale_checkpoint_temporaries, save_nnunet_checkpoint_with)
from nnunetv2_bcp.training.nnUNetTrainerLabelSubset import LabelSubsetMixin
from nnunetv2_bcp.training.schedule import StagedPolyLRScheduler, TrainingStages
from nnunetv2_bcp.training.start_from_model import ContinueOnlyWhereStartedFromModel
from nnunetv2_bcp.unlabeled.loader import (UnlabeledDataset, make_unlabeled_stream, shutdown_stream,
                                           unlabeled_augmentation_workers)
from nnunetv2_bcp.unlabeled.preprocess import unlabeled_cases_for_training
from nnunetv2_bcp.unlabeled.raw import UNLABELED_FOLDER, UnlabeledDataError
from nnunetv2_bcp.unlabeled.weak_view import split_views, with_weak_view

# Share of the schedule spent in stage 1. Stage 1 is nnU-Net's own training on the labeled cases and the learning rate
# restarts at stage 2: one run of the recipe measured on the label-scarce benchmark (a labeled-only nnU-Net model
# trained to its end, then BCP from it with a fresh schedule of as many iterations; docs/benchmarks.md).
PRETRAIN_FRACTION = 0.5
# Stage 1 goes on past its length while the student's Dice of some class on its labeled training patches is below
# this, up to a share of the schedule: a teacher that cannot see a class teaches the student to miss it. With a
# restart the learning rate restarts at the planned switch all the same (stage 1 has decayed to its end, and more of
# it would teach nothing), and the teacher is made once the student sees every class.
PRETRAIN_MIN_DICE = 0.1
MAX_PRETRAIN_FRACTION = 0.5
MAX_PRETRAIN_FRACTION_WITH_RESTART = 0.75
# bcp_largest_component = "auto": a class keeps only its largest pseudo-label component when its reference labels form
# one component in at least this share of their occurrences (cases; slices for 2d) among the first labeled cases:
# for a class of many instances (lesions, nodules) the filter would train every other instance as background.
SINGLE_COMPONENT_SHARE = 0.5
LARGEST_COMPONENT_SAMPLE_CASES = 100
SKIPPED_STEP = 'bcp_skipped'  # marks the output of a step whose update was skipped


# The settings of the stage-2 method that a resumed run (--c) keeps from its checkpoint, so that it ends as it began
# when the plugin's defaults change between the start and the resume; each with the value a checkpoint that lacks
# the entry was trained with (None: every BCP checkpoint holds it).
STAGE_TWO_SETTINGS = {"bcp_alpha": None, "bcp_labeled_loss_weight": 0.0, "bcp_teacher_weak_view": False,
                      "bcp_ema_decay": None, "bcp_mask_ratio": None, "bcp_largest_component": None}
# The same for the stages: what stage 1 trains, its length, whether the learning rate restarts at stage 2.
STAGE_SETTINGS = {"bcp_stage_one": "copy_paste", "bcp_pretrain_epochs": None, "bcp_restart_lr": False}
STAGE_ONE_KINDS = ("nnunet", "copy_paste")


class nnUNetTrainerBCP(ContinueOnlyWhereStartedFromModel, LabelSubsetMixin, nnUNetTrainer):
    """BCP semi-supervised training. Knobs (override in a subclass, nnU-Net's way):

    ``bcp_stage_one`` (what stage 1 trains on the labeled cases: "nnunet", nnU-Net's own step, or "copy_paste",
    the paper's copy-paste between labeled patches), ``bcp_pretrain_epochs`` (stage 1 length; unset:
    ``bcp_pretrain_fraction`` of ``num_epochs``, a half), ``bcp_restart_lr`` (after stage 1's length nnU-Net's poly
    schedule restarts from ``initial_lr`` with a fresh optimiser state, as a model continued by a second training
    would; else one decay over the whole run), ``bcp_pretrain_min_dice`` and ``bcp_max_pretrain_epochs`` (stage 1
    goes on, up to the latter, while the student's Dice of a class on its labeled training patches is below the
    former, with a restart at the restarted learning rate; 0 turns this off; the latter defaults to three quarters of
    the schedule with a restart, half without),
    ``bcp_alpha`` (weight of unlabeled-origin voxels, 0.5), ``bcp_labeled_loss_weight`` (nnU-Net's loss on the
    un-mixed labeled patches beside the BCP loss, 1; 0 = the paper's loss alone), ``bcp_teacher_weak_view`` (the
    teacher labels a view without intensity augmentation), ``bcp_ema_decay`` (λ, 0.99), ``bcp_mask_ratio`` (β,
    2/3), ``bcp_largest_component`` (keep the largest component of a class's pseudo-labels: "auto" per class from
    the labeled cases, True, False, or a list of label values / region indices),
    plus nnU-Net's ``num_epochs``, ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch``.

    A label subset (``nnUNetv2_bcp_label_subset``) is used only by the trainers that opt in
    (``nnUNetTrainerBCP_labelSubset``, ``uses_label_subset = True``).
    """
    uses_label_subset = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # None: a share of num_epochs as it stands when training starts (subclasses often set num_epochs after this)
        self.bcp_stage_one = "nnunet"
        self.bcp_pretrain_epochs = None
        self.bcp_pretrain_fraction = PRETRAIN_FRACTION
        self.bcp_restart_lr = True
        self.bcp_stage_two_start_epoch = None  # set when stage 2 begins
        self.bcp_lr_restart_epoch = None  # set when the learning rate restarts (bcp_restart_lr)
        self.bcp_pretrain_min_dice = PRETRAIN_MIN_DICE
        self.bcp_max_pretrain_epochs = None
        self.bcp_alpha = 0.5
        # not in the paper: chosen on the label-scarce benchmark's validation cases (docs/benchmarks.md)
        self.bcp_labeled_loss_weight = 1.0
        self.bcp_teacher_weak_view = False
        self.bcp_ema_decay = 0.99
        self.bcp_mask_ratio = 2 / 3
        self.bcp_largest_component = "auto"
        self.bcp_largest_component_classes = None  # what the setting resolves to (largest_component_classes())
        self.teacher = None
        self.teacher_forward = None  # the teacher, compiled where nnU-Net compiled the student
        self.bcp_loss = None
        self.dataloader_unlabeled = None
        self.bcp_teacher_initialized = False
        self.bcp_iteration = 0
        self.bcp_max_nonfinite_steps = 10
        self.bcp_nonfinite_in_a_row = 0
        self.bcp_student_train_dice = None  # per class, on labeled training patches, after the last stage-1 epoch
        self.bcp_rank_batch_sizes = None  # under DDP: every rank's batch size, in rank order

    # ------------------------------------------------------------------ set-up
    def bcp_settings(self) -> dict:
        return {"bcp_stage_one": self.bcp_stage_one, "bcp_pretrain_epochs": self.pretrain_epochs(),
                "bcp_restart_lr": self.bcp_restart_lr, "bcp_pretrain_min_dice": self.bcp_pretrain_min_dice,
                "bcp_max_pretrain_epochs": self.max_pretrain_epochs(), "bcp_alpha": self.bcp_alpha,
                "bcp_labeled_loss_weight": self.bcp_labeled_loss_weight,
                "bcp_teacher_weak_view": self.bcp_teacher_weak_view,
                "bcp_ema_decay": self.bcp_ema_decay, "bcp_mask_ratio": self.bcp_mask_ratio,
                "bcp_largest_component": self.bcp_largest_component,
                "bcp_largest_component_classes": self.bcp_largest_component_classes, "num_epochs": self.num_epochs,
                "num_iterations_per_epoch": self.num_iterations_per_epoch,
                "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                "batch_size": self.configuration_manager.batch_size, "box_stride": list(self.bcp_box_stride()),
                "label_subset": self.label_subset_in_use}

    def initialize(self):
        if self.is_cascaded:
            raise SystemExit(f"{self.__class__.__name__}: cascade configurations ({self.configuration_name}) are not "
                             f"supported yet: the unlabeled cases would need predictions of the previous stage. "
                             f"Train 3d_fullres, 3d_lowres or 2d instead.")
        super().initialize()
        student = unwrap_network(self.network)
        self.teacher = copy.deepcopy(student).float()
        if hasattr(self.teacher, "decoder"):  # nnU-Net's architectures: the teacher only labels at full resolution
            self.teacher.decoder.deep_supervision = False
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        # where nnU-Net compiles the student (nnUNet_compile on CUDA), an eager teacher would launch its forward pass
        # kernel by kernel; the compiled wrapper shares the teacher's tensors, so the EMA and checkpoints see one module
        self.teacher_forward = torch.compile(self.teacher) if is_compiled(self.network) else self.teacher
        self.bcp_loss = self._build_bcp_loss()

    def _build_bcp_loss(self) -> torch.nn.Module:
        """The stage-2 loss, built like nnU-Net's ``_build_loss`` and overridable the same way: by default
        :class:`BCPLoss` with ``self.loss``'s Dice module, CE weighting and deep-supervision weights. An override
        returns a module called as ``BCPLoss`` is (inside nnU-Net's ``DeepSupervisionWrapper`` where deep supervision
        is on) that returns ``stack([L_labeled, L_unlabeled])``."""
        return BCPLoss.like_nnunet_loss(self.loss)

    def bcp_box_stride(self) -> tuple:
        """Coarsest deep-supervision downsampling per axis: boxes on this grid are exact at every scale."""
        scales = self._get_deep_supervision_scales()
        if not scales:
            return (1,) * len(self.configuration_manager.patch_size)
        return tuple(int(round(1 / s)) for s in scales[-1])

    def _raw_dataset_folder(self) -> Optional[str]:
        """``nnUNet_raw/DatasetXXX``, or None where nnUNet_raw is not set (training needs only nnUNet_preprocessed
        once the unlabeled images are preprocessed)."""
        return join(nnUNet_raw, self.plans_manager.dataset_name) if nnUNet_raw.is_set() else None

    def _unlabeled_keys(self) -> Tuple[str, List[str], List[str]]:
        """The unlabeled cases of this fold: (folder of the preprocessed ``imagesUnlabeled`` cases, their keys, the
        fold's training cases whose labels the label subset drops, read from nnU-Net's own preprocessed folder).
        Brings the preprocessed unlabeled data up to date where the raw images are there."""
        subset = self._label_subset_of_fold()  # a missing or wrong subset file stops here, before preprocessing
        raw = self._raw_dataset_folder()
        folder, keys = unlabeled_cases_for_training(
            self.plans_manager.plans, self.configuration_name, self.dataset_json, raw,
            self.preprocessed_dataset_folder_base, num_processes=max(1, get_allowed_n_proc_DA()),
            verbose=self.local_rank == 0, log=self.print_to_log_file)
        label_dropped = subset["unlabeled"] if subset is not None else []
        if not keys and not label_dropped:
            where = join(raw or f"nnUNet_raw/{self.plans_manager.dataset_name}", UNLABELED_FOLDER) + \
                ("" if raw else " (nnUNet_raw is not set)")
            subset_file = self.unused_label_subset()
            if subset_file:
                simulate = (f"train -tr nnUNetTrainerBCP_labelSubset (or a subclass with uses_label_subset = True) "
                            f"to use the label subset in {subset_file}, which {self.__class__.__name__} leaves "
                            f"unused")
            else:
                simulate = (f"simulate label scarcity with 'nnUNetv2_bcp_label_subset -d "
                            f"{self.plans_manager.dataset_name} -k K' and train -tr nnUNetTrainerBCP_labelSubset")
            raise UnlabeledDataError(
                f"{self.__class__.__name__} needs unlabeled images and found none. Put them in "
                f"{where}, named like imagesTr (CASE_0000{self.dataset_json['file_ending']}, "
                f"one file per channel), or {simulate}.")
        return folder, sorted(keys), sorted(label_dropped)

    def get_dataloaders(self):
        """nnU-Net's labeled loaders, with nnU-Net's own worker count, plus the unlabeled stream, whose workers start
        at its first batch (stage 2) and then share the CPUs (see ``unlabeled_augmentation_workers``)."""
        try:
            folder, keys, label_dropped = self._unlabeled_keys()
        except UnlabeledDataError as e:
            raise SystemExit(f"ERROR ({self.__class__.__name__}): {e}")
        dataloader_train, dataloader_val = super().get_dataloaders()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # no deep-supervision targets and no regions: the stream's target (the nonzero mask) only serves the
        # transforms' own masking; BCP's unlabeled targets are the teacher's pseudo-labels
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False)
        if self.bcp_teacher_weak_view:
            transforms = with_weak_view(transforms)
        dataset = UnlabeledDataset(folder, keys, self.preprocessed_dataset_folder, label_dropped, self.label_manager,
                                   self.configuration_manager.use_mask_for_norm)
        workers = unlabeled_augmentation_workers(get_allowed_n_proc_DA())
        self.dataloader_unlabeled = make_unlabeled_stream(
            dataset, self.batch_size, initial_patch_size, self.configuration_manager.patch_size, self.label_manager,
            transforms, workers, pin_memory=self.device.type == 'cuda')
        self.print_to_log_file(f"BCP unlabeled stream: {len(dataset.identifiers)} cases ({len(keys)} from "
                               f"{UNLABELED_FOLDER}, {len(label_dropped)} label-dropped training cases read from "
                               f"nnU-Net's preprocessed folder), {workers} augmentation worker(s) from stage 2 on; "
                               f"labeled stream: nnU-Net's {get_allowed_n_proc_DA()}")
        return dataloader_train, dataloader_val

    def check_stage_lengths(self) -> None:
        """Refuse, before any work, a stage 1 that would take the whole schedule or is of an unknown kind."""
        if self.bcp_stage_one not in STAGE_ONE_KINDS:
            raise SystemExit(f"ERROR ({self.__class__.__name__}): bcp_stage_one={self.bcp_stage_one!r} is none of "
                             f"{list(STAGE_ONE_KINDS)}")
        if not self.in_stage_two() and self.pretrain_epochs() >= self.num_epochs:
            raise SystemExit(f"ERROR ({self.__class__.__name__}): bcp_pretrain_epochs={self.pretrain_epochs()} is not "
                             f"below num_epochs={self.num_epochs}, so stage 2 (BCP) would never start. Lower "
                             f"bcp_pretrain_epochs or leave it unset (then it is {self.bcp_pretrain_fraction:g} of "
                             f"num_epochs).")
        if not self.in_stage_two() and self.bcp_pretrain_min_dice and self.max_pretrain_epochs() >= self.num_epochs:
            # only a bcp_max_pretrain_epochs set by the user: the default leaves the last epoch to stage 2
            raise SystemExit(f"ERROR ({self.__class__.__name__}): bcp_max_pretrain_epochs={self.max_pretrain_epochs()} "
                             f"is not below num_epochs={self.num_epochs}: while the student misses a class, stage 1 "
                             f"could take the whole schedule and BCP never start. Lower bcp_max_pretrain_epochs.")

    def configure_optimizers(self):
        """nnU-Net's optimiser and poly schedule, the latter restartable at stage 2 (a trainer that brings another
        schedule keeps it, and its learning rate does not restart)."""
        optimizer, lr_scheduler = super().configure_optimizers()
        if type(lr_scheduler) is PolyLRScheduler:
            lr_scheduler = StagedPolyLRScheduler(optimizer, lr_scheduler.initial_lr, lr_scheduler.max_steps,
                                                 self.training_stages, lr_scheduler.exponent)
        return optimizer, lr_scheduler

    def training_stages(self) -> TrainingStages:
        """The stages as the learning-rate schedule follows them: the settings as resolved, or as kept from the
        checkpoint under --c."""
        return TrainingStages(self.bcp_restart_lr, self.pretrain_epochs(), self.bcp_lr_restart_epoch)

    def restarts_lr(self) -> bool:
        """Whether the learning rate restarts after stage 1's length (not under a schedule another trainer brings)."""
        foreign = self.lr_scheduler is not None and not isinstance(self.lr_scheduler, StagedPolyLRScheduler)
        return self.bcp_restart_lr and not foreign

    def on_train_start(self):
        self.check_stage_lengths()
        super().on_train_start()
        self.largest_component_classes()  # decided (and a wrong setting refused) before any training
        if self.is_ddp:  # for the directions of the global batch (draw_directions)
            import torch.distributed as dist
            self.bcp_rank_batch_sizes = [None] * dist.get_world_size()
            dist.all_gather_object(self.bcp_rank_batch_sizes, self.batch_size)
        settings = self.bcp_settings()
        if self.local_rank == 0:
            remove_stale_checkpoint_temporaries(self.output_folder)
            save_json(settings, join(self.output_folder, "bcp_settings.json"), sort_keys=False)
        self.print_to_log_file("BCP settings:", settings)
        self.logger.update_config(settings)  # e.g. W&B, when nnUNet_wandb_enabled

    def on_train_end(self):
        super().on_train_end()
        shutdown_stream(self.dataloader_unlabeled)

    def run_training(self):
        try:
            super().run_training()
        finally:  # also on errors: don't leave the unlabeled workers behind
            shutdown_stream(self.dataloader_unlabeled)

    # ------------------------------------------------------------------ training
    def _foreground_classes(self) -> list:
        """The classes the per-class figures refer to: regions for region-based training, else labels."""
        lm = self.label_manager
        return lm.foreground_regions if lm.has_regions else lm.foreground_labels

    def in_stage_two(self) -> bool:
        return self.bcp_teacher_initialized

    def pretrain_epochs(self) -> int:
        """Stage 1 length: ``bcp_pretrain_epochs`` if set, else a share of ``num_epochs`` as it stands now."""
        if self.bcp_pretrain_epochs is not None:
            return self.bcp_pretrain_epochs
        return int(round(self.bcp_pretrain_fraction * self.num_epochs))

    def max_pretrain_epochs(self) -> int:
        """The latest epoch stage 2 starts at while the student misses a class: ``bcp_max_pretrain_epochs`` if set,
        else a share of ``num_epochs`` that leaves at least the last epoch to stage 2."""
        if self.bcp_max_pretrain_epochs is not None:
            return self.bcp_max_pretrain_epochs
        share = MAX_PRETRAIN_FRACTION_WITH_RESTART if self.restarts_lr() else MAX_PRETRAIN_FRACTION
        return max(self.pretrain_epochs(), min(int(round(share * self.num_epochs)), self.num_epochs - 1))

    def classes_the_student_misses(self, dice_per_class: list) -> list:
        """Classes (regions) whose Dice in ``dice_per_class`` is below ``bcp_pretrain_min_dice`` (NaN, a class
        absent from the patches, does not count)."""
        if not self.bcp_pretrain_min_dice:
            return []
        return [_plain(n) for n, d in zip(self._foreground_classes(), dice_per_class) if d < self.bcp_pretrain_min_dice]

    def start_stage_two_now(self) -> bool:
        """From ``pretrain_epochs()`` on, unless the student still misses a class on its own labeled training
        patches (then stage 1 goes on, at most until ``max_pretrain_epochs()``). Judged on training patches, not on
        nnU-Net's validation cases, so that the rule uses no label the labeled-only baseline does not have."""
        if self.current_epoch < self.pretrain_epochs():
            return False
        dice_per_class = self.bcp_student_train_dice
        missing = self.classes_the_student_misses(dice_per_class) if dice_per_class is not None else []
        if not missing:
            return True
        dice = ", ".join(f"{d:.4f}" for d in dice_per_class)
        if self.current_epoch < self.max_pretrain_epochs():
            restarted = "" if self.bcp_lr_restart_epoch is None else \
                f" with the learning rate restarted at epoch {self.bcp_lr_restart_epoch}"
            self.print_to_log_file(
                f"BCP: stage 1 goes on{restarted}: the student's Dice per class on its labeled training patches is "
                f"[{dice}], below bcp_pretrain_min_dice={self.bcp_pretrain_min_dice} for {missing}; a teacher made "
                f"from it would label those as background (stage 2 starts by epoch {self.max_pretrain_epochs()} at "
                f"the latest)")
            return False
        self.print_to_log_file(
            f"WARNING: stage 2 starts at bcp_max_pretrain_epochs={self.max_pretrain_epochs()} although the student's "
            f"Dice per class on its labeled training patches is [{dice}] ({missing} below "
            f"{self.bcp_pretrain_min_dice})")
        return True

    @torch.no_grad()
    def measure_student_on_training_patches(self) -> list:
        """Per-class Dice of the student on ``num_val_iterations_per_epoch`` fresh labeled training batches, through
        nnU-Net's own ``validation_step`` (summed over the batches and over DDP ranks; NaN for a class absent from
        every patch and never predicted)."""
        self.network.eval()
        outputs = [self.validation_step(next(self.dataloader_train)) for _ in range(self.num_val_iterations_per_epoch)]
        self.network.train()
        counts = torch.tensor(np.stack([np.sum([o[k] for o in outputs], 0) for k in ('tp_hard', 'fp_hard', 'fn_hard')]),
                              dtype=torch.float64)
        if self.is_ddp:
            import torch.distributed as dist
            counts = counts.to(self.device)
            dist.all_reduce(counts)
        tp, fp, fn = counts.cpu().numpy()
        with np.errstate(invalid='ignore', divide='ignore'):
            return (2 * tp / (2 * tp + fp + fn)).tolist()

    def on_train_epoch_start(self):
        if not self.in_stage_two() and self.current_epoch >= self.pretrain_epochs():
            if self.restarts_lr() and self.bcp_lr_restart_epoch is None:
                self.restart_learning_rate()
            if self.start_stage_two_now():
                self.begin_stage_two()
        super().on_train_epoch_start()  # nnU-Net's, with the learning rate of the stage this epoch belongs to
        self.print_to_log_file(f"BCP stage {2 if self.in_stage_two() else 1}")

    def restart_learning_rate(self) -> None:
        """At the end of stage 1's planned length: the poly schedule starts again from ``initial_lr`` over the
        remaining epochs and the optimiser's momentum is cleared, as for a model continued by a new training."""
        self.optimizer.state.clear()
        self.bcp_lr_restart_epoch = self.current_epoch

    def begin_stage_two(self) -> None:
        """Stage 1 -> 2 at the start of this epoch: the trained student initialises the teacher (with a restart, at
        the epoch the learning rate restarted, or later while the student missed a class)."""
        self.teacher.load_state_dict(unwrap_network(self.network).state_dict())
        self.bcp_teacher_initialized = True
        self.bcp_stage_two_start_epoch = self.current_epoch
        # checkpoint_best.pth holds stage 2's best from now on: stage 1's (a labeled-only model) would otherwise stay
        # there while stage 2, its learning rate restarted, is below it
        self._best_ema = None
        restart = ""
        if self.bcp_lr_restart_epoch == self.current_epoch:
            restart = (f"; the learning rate restarts at {self.initial_lr} and decays over the remaining "
                       f"{self.num_epochs - self.current_epoch} epochs, the optimiser's momentum cleared")
        elif self.bcp_lr_restart_epoch is not None:
            restart = f" (the learning rate restarted at epoch {self.bcp_lr_restart_epoch})"
        self.print_to_log_file(f"BCP stage 2 from epoch {self.current_epoch}: teacher initialised from the "
                               f"student{restart}")

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context()

    def _random_mask(self, batch_size: int) -> torch.Tensor:
        return random_box_mask(self.configuration_manager.patch_size, batch_size, self.bcp_mask_ratio,
                               self.bcp_box_stride(), device=self.device)

    def train_step(self, batch: dict) -> dict:
        if not self.in_stage_two():
            return self.stage_one_step(batch)
        return self.stage_two_step(batch, next(self.dataloader_unlabeled))

    def stage_one_step(self, batch: dict) -> dict:
        """nnU-Net's own step on the labeled batch ("nnunet"), or the paper's: copy-paste between the labeled patches
        of the batch, then nnU-Net's step and loss ("copy_paste")."""
        if self.bcp_stage_one == "nnunet":
            return super().train_step(batch)
        data = batch['data'].to(self.device, non_blocking=True)
        targets = [t.to(self.device, non_blocking=True) for t in _as_list(batch['target'])]
        mask = self._random_mask(data.shape[0])
        mixed_targets = [copy_paste(t, labeled_partner(t), downsample_mask(mask, t.shape[2:])) for t in targets]
        mixed = {'data': copy_paste(data, labeled_partner(data), mask),
                 'target': mixed_targets if isinstance(batch['target'], list) else mixed_targets[0]}
        return super().train_step(mixed)

    @torch.no_grad()
    def make_pseudo_labels(self, unlabeled: torch.Tensor) -> torch.Tensor:
        """Teacher pseudo-labels of a batch of unlabeled patches in nnU-Net's target layout (regions: plus an empty
        ignore channel if needed); the largest-component filter runs where the labels are (on a GPU: no copy to the
        host, see :func:`keep_largest_component`)."""
        with self._autocast():
            logits = _as_list(self.teacher_forward(unlabeled))[0]
        regions = self.label_manager.has_regions
        labels = pseudo_labels(logits.float(), region_based=regions)
        classes = self.largest_component_classes()
        if classes:
            every_class = len(classes) == len(self._foreground_classes())
            labels = keep_largest_component(labels, region_based=regions, classes=None if every_class else classes)
        if regions and self.label_manager.has_ignore_label:
            labels = torch.cat([labels, torch.zeros_like(labels[:, :1])], 1)
        return labels

    def draw_directions(self, batch_size: int) -> torch.Tensor:
        """Which samples of this step are ``X^in``: half of the batch, or under DDP half of the global batch (every
        rank draws the same permutation, seeded by the step, which all ranks count alike, and takes its share)."""
        if self.bcp_rank_batch_sizes is None:
            return inward_directions(batch_size)
        rank = self.local_rank
        return inward_directions(batch_size, torch.Generator().manual_seed(self.bcp_iteration),
                                 rank_offset=sum(self.bcp_rank_batch_sizes[:rank]),
                                 global_batch_size=sum(self.bcp_rank_batch_sizes))

    def _class_masks(self) -> dict:
        """Class of the pseudo-labels (label value; region: channel index) -> the reference label values it covers."""
        lm = self.label_manager
        if lm.has_regions:
            return {i: [int(v) for v in _as_list(region)] for i, region in enumerate(lm.foreground_regions)}
        return {int(v): [int(v)] for v in lm.foreground_labels}

    def largest_component_classes(self) -> list:
        """The classes whose pseudo-labels keep only their largest connected component (``bcp_largest_component``):
        all (True), none (False), those listed, or ("auto") those whose reference labels in the labeled training cases
        usually form one component. Decided once and logged."""
        if self.bcp_largest_component_classes is not None:
            return self.bcp_largest_component_classes
        setting, classes = self.bcp_largest_component, self._class_masks()
        if setting is True or setting is False:
            chosen = sorted(classes) if setting else []
        elif setting == "auto":
            chosen = self._single_component_classes(classes)
        else:
            unknown = sorted(set(_as_list(setting)) - set(classes))
            if unknown or isinstance(setting, str):
                raise SystemExit(f"ERROR ({self.__class__.__name__}): bcp_largest_component={setting!r}: expected "
                                 f"'auto', True, False or a list of classes among {sorted(classes)}")
            chosen = sorted(_as_list(setting))
        self.bcp_largest_component_classes = chosen
        self.print_to_log_file(f"BCP: pseudo-labels keep only their largest component for classes {chosen} of "
                               f"{sorted(classes)} (bcp_largest_component={setting!r})")
        return chosen

    def _single_component_classes(self, classes: dict) -> list:
        labeled = getattr(self, "labeled_training_identifiers", None) or self.get_tr_and_val_datasets()[0].identifiers
        ids = sorted(labeled)[:LARGEST_COMPONENT_SAMPLE_CASES]
        dataset = self.dataset_class(self.preprocessed_dataset_folder, ids)
        segmentations = (np.asarray(dataset.load_case(i)[1][:])[0] for i in ids)
        per_slice = len(self.configuration_manager.patch_size) == 2
        share = single_component_share(segmentations, classes, per_slice=per_slice)
        rounded = {c: None if s is None else round(s, 3) for c, s in share.items()}
        self.print_to_log_file(f"BCP: share of one-component occurrences per class in {len(ids)} labeled cases' "
                               f"reference labels: {rounded}")
        return [c for c, s in share.items() if s is not None and s >= SINGLE_COMPONENT_SHARE]

    def stage_two_step(self, batch: dict, unlabeled_batch: dict) -> dict:
        """Teacher pseudo-labels, bidirectional copy-paste, α-weighted loss at every scale, SGD step, EMA."""
        labeled = batch['data'].to(self.device, non_blocking=True)
        targets = [t.to(self.device, non_blocking=True) for t in _as_list(batch['target'])]
        unlabeled = unlabeled_batch['data'].to(self.device, non_blocking=True)
        if self.bcp_teacher_weak_view:  # the teacher labels the weak view, the student learns on the full one
            unlabeled, weak = split_views(unlabeled)
            pseudo = self.make_pseudo_labels(weak)
        else:
            pseudo = self.make_pseudo_labels(unlabeled)

        batch_size = labeled.shape[0]
        inward = self.draw_directions(batch_size)  # on the CPU: the loss decides per direction without a device sync
        from_labeled = labeled_origin(self._random_mask(batch_size), inward.to(self.device, non_blocking=True))
        masks = [downsample_mask(from_labeled, t.shape[2:]) for t in targets]
        mixed = mix_by_origin(labeled, unlabeled, from_labeled)
        supervised = self.bcp_labeled_loss_weight > 0

        self.optimizer.zero_grad(set_to_none=True)
        # With the supervised term the labeled patches pass the student on their own, after the mixed patches' loss has
        # been backpropagated and their activations freed: the peak memory of one batch instead of two, and the
        # gradients add up to those of one pass on both (nnU-Net's networks normalise each sample on its own). Under
        # DDP the gradients are reduced once, after the second backward.
        with self._without_gradient_sync() if supervised else dummy_context():
            with self._autocast():
                mixed_outputs = _as_list(self.network(mixed))
            mixed_targets = [mix_by_origin(t, downsample_mask(pseudo, t.shape[2:]), m) for t, m in zip(targets, masks)]
            with self._autocast():
                if isinstance(self.bcp_loss, DeepSupervisionWrapper):
                    terms = self.bcp_loss(mixed_outputs, mixed_targets, masks, [inward] * len(masks))
                else:
                    terms = self.bcp_loss(mixed_outputs[0], mixed_targets[0], masks[0], inward)
                loss = bcp_total(terms, self.bcp_alpha)
            self._backward(loss)
        if supervised:
            with self._autocast():
                labeled_outputs = _as_list(self.network(labeled))
                deep_supervision = isinstance(self.loss, DeepSupervisionWrapper)  # nnU-Net's loss, whatever the BCP one
                supervised_loss = self.bcp_labeled_loss_weight * self.loss(
                    labeled_outputs if deep_supervision else labeled_outputs[0],
                    targets if deep_supervision else targets[0])
            self._backward(supervised_loss)
            loss = loss.detach() + supervised_loss.detach()
        stepped = self._clip_and_step()
        if not stepped and not self._grad_scaler_overflow(loss):
            return self._skip_nonfinite_step(loss, batch, unlabeled_batch)
        self.bcp_nonfinite_in_a_row = 0
        if stepped:  # after a step the grad scaler skipped, the student is unchanged and the teacher stays too
            ema_update_(self.teacher, self.network, self.bcp_ema_decay)
            self.bcp_iteration += 1
        return {'loss': loss.detach().cpu().numpy(),
                'bcp': step_figures(mixed_outputs[0], mixed_targets[0], masks[0], pseudo, targets[0], terms,
                                    self.label_manager)}

    def _without_gradient_sync(self):
        """DDP's ``no_sync``: a backward inside it accumulates this rank's gradients without reducing them."""
        return self.network.no_sync() if self.is_ddp else dummy_context()

    def _backward(self, loss: torch.Tensor) -> None:
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    def _clip_and_step(self) -> bool:
        """nnU-Net's clipping and step after the backward passes, except that a step with non-finite gradients is
        skipped (returns False). Under DDP the gradient all-reduce carries a NaN or inf of any rank to all of them, so
        every rank takes the same decision without a collective of its own."""
        params = self.network.parameters()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)  # skips the step itself on non-finite gradients
            self.grad_scaler.update()
            return bool(torch.isfinite(grad_norm))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 12)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        return finite

    def _grad_scaler_overflow(self, loss: torch.Tensor) -> bool:
        """Non-finite gradients from a finite loss (on every rank) under mixed precision: the routine overflow of the
        scaled fp16 gradients, after which the grad scaler skipped the step and lowered its scale; nnU-Net goes on
        silently, and so does BCP. Called on every rank alike (the gradients, hence the decision to call, are the
        same on all ranks after DDP's all-reduce), so the all-reduce of the loss's finiteness here cannot hang."""
        if self.grad_scaler is None:
            return False
        finite = torch.isfinite(loss.detach()).float()
        if self.is_ddp:
            import torch.distributed as dist
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_nonfinite_step(self, loss: torch.Tensor, batch: dict, unlabeled_batch: dict) -> dict:
        """No optimizer step and no EMA update on non-finite gradients (the teacher stays clean); name the cases.
        Stops training after ``bcp_max_nonfinite_steps`` such steps in a row (on every rank: the decision is the
        same everywhere)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bcp_nonfinite_in_a_row += 1
        if not torch.isfinite(loss):
            origin = f"loss {loss.item()}" + (" on this rank" if self.is_ddp else "")
        elif self.grad_scaler is not None:  # under DDP: another rank's loss was not finite
            origin = f"loss {loss.item():.4f} on this rank, a non-finite loss on another rank"
        else:
            origin = f"loss {loss.item():.4f}" + (" on this rank, non-finite gradients from another rank" if self.is_ddp
                                                  else ", non-finite gradients")
        message = (f"BCP: non-finite gradients at epoch {self.current_epoch} ({origin}; labeled cases "
                   f"{list(batch['keys'])}, unlabeled cases {list(unlabeled_batch['keys'])}); step skipped, teacher "
                   f"not updated")
        self.print_to_log_file("WARNING: " + message)
        if self.local_rank != 0:  # nnU-Net logs on rank 0 only; the cases of this rank's batch are named here
            print(f"rank {self.local_rank}: WARNING: {message}", flush=True)
        if self.bcp_nonfinite_in_a_row >= self.bcp_max_nonfinite_steps:
            raise FloatingPointError(f"{message}. {self.bcp_nonfinite_in_a_row} non-finite steps in a row: "
                                     f"stopping; check these cases and the learning rate")
        return {'loss': np.array(float("nan")), SKIPPED_STEP: True,
                'bcp': skipped_step_figures(len(self._foreground_classes()), self.device)}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        steps = [o.pop('bcp') for o in train_outputs if 'bcp' in o]  # nnU-Net's collate_outputs takes no tensors
        # the epoch's loss is that of the steps taken: a step skipped here (said in the log) would make it NaN, while
        # a NaN of a step that ran (nnU-Net's own stage-1 step) stays in it
        taken = [o for o in train_outputs if not o.pop(SKIPPED_STEP, False)]
        super().on_train_epoch_end(taken or train_outputs)
        if not self.in_stage_two():
            if self.bcp_pretrain_min_dice and self.current_epoch + 1 >= self.pretrain_epochs():
                self.bcp_student_train_dice = self.measure_student_on_training_patches()
                self.print_to_log_file("BCP: the student's Dice per class on labeled training patches",
                                       np.round(self.bcp_student_train_dice, 4).tolist())
            return
        if steps:
            self.report_stage_two_epoch(epoch_figures(steps))

    def report_stage_two_epoch(self, figures: dict) -> None:
        """Log the epoch's figures (averaged over ranks), warn about classes the teacher hardly labels, and record
        them in ``bcp_progress.json`` / ``.png``."""
        if self.is_ddp:
            import torch.distributed as dist
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, figures)
            figures = {k: np.mean([g[k] for g in gathered], axis=0).tolist() for k in figures}
        self.print_to_log_file(
            f"BCP: loss on labeled-origin voxels {figures['bcp_loss_labeled']:.4f}, on unlabeled-origin voxels "
            f"{figures['bcp_loss_unlabeled']:.4f}; pseudo-label foreground fraction per "
            f"{'region' if self.label_manager.has_regions else 'class'} "
            f"{np.round(figures['bcp_pseudo_fg_fraction'], 4).tolist()}; "
            f"student-teacher agreement on unlabeled voxels {figures['bcp_agreement']:.4f}; foreground fraction in "
            f"the labeled patches {np.round(figures['bcp_labeled_fg_fraction'], 4).tolist()}")
        self._warn_if_teacher_misses_classes(figures['bcp_pseudo_fg_fraction'], figures['bcp_labeled_fg_fraction'])
        if self.local_rank == 0:
            record_progress(self.output_folder, self.current_epoch, figures,
                            [str(_plain(c)) for c in self._foreground_classes()])

    def _warn_if_teacher_misses_classes(self, pseudo_fg_fraction: List[float],
                                        labeled_fg_fraction: List[float]) -> None:
        """A teacher that (almost) never labels a class gives that class mostly background on unlabeled-origin
        voxels, which teaches the student to miss it: seen on short schedules whose stage 1 ended before the
        student had learnt every class."""
        rare = classes_below_share([_plain(c) for c in self._foreground_classes()], pseudo_fg_fraction,
                                   labeled_fg_fraction)
        if rare:
            regions = self.label_manager.has_regions
            kind = ("region" if regions else "class") if len(rare) == 1 else ("regions" if regions else "classes")
            self.print_to_log_file(
                f"WARNING: the teacher's pseudo-labels hold {kind} {[n for n, _, _ in rare]} on "
                f"{[round(p, 4) for _, p, _ in rare]} of the unlabeled voxels against "
                f"{[round(q, 4) for _, _, q in rare]} in the labeled patches (less than {LOW_PSEUDO_LABEL_SHARE:g} "
                f"of it), so they are mostly trained as background there. If this lasts more than a few epochs, "
                f"stage 1 was too short for the teacher to learn them: raise bcp_pretrain_epochs "
                f"(now {self.pretrain_epochs()}) or bcp_pretrain_min_dice (now {self.bcp_pretrain_min_dice}).")

    # ------------------------------------------------------------------ checkpoints
    def bcp_state(self) -> dict:
        """What a BCP checkpoint holds beside nnU-Net's entries."""
        return {'teacher_weights': self.teacher.state_dict(), 'teacher_initialized': self.bcp_teacher_initialized,
                'stage_two_start_epoch': self.bcp_stage_two_start_epoch,
                'lr_restart_epoch': self.bcp_lr_restart_epoch,
                'iteration': self.bcp_iteration, 'student_train_dice': self.bcp_student_train_dice,
                'settings': self.bcp_settings()}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus a ``bcp`` entry, in one atomic write (see :mod:`..checkpoint`)."""
        save_nnunet_checkpoint_with(super().save_checkpoint, filename, {'bcp': self.bcp_state()})

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's ``load_checkpoint``, after the checkpoint is checked: it must come from a BCP trainer of the same
        plans, configuration and labels. The BCP entry is read from a memory-mapped load (only what is used is read);
        nnU-Net reads its own entries."""
        path = filename_or_checkpoint
        if not isinstance(path, str):
            raise TypeError(f"{self.__class__.__name__}.load_checkpoint takes a checkpoint's path (as nnU-Net 2.8's "
                            f"does), not {type(path).__name__}")
        try:
            checkpoint = load_checkpoint(path, mmap=True)
        except UnreadableCheckpointError as e:
            raise SystemExit(f"ERROR ({self.__class__.__name__}): {e}")
        if 'bcp' not in checkpoint:
            raise SystemExit(f"ERROR ({self.__class__.__name__}): {path} was written by "
                             f"{checkpoint.get('trainer_name', 'another trainer')}, not by a BCP trainer, and has no "
                             f"teacher; start BCP from it with nnUNetv2_bcp_start_from_model instead of --c.")
        reason = incompatibility(checkpoint, self.plans_manager.plans_name, self.configuration_name,
                                 self.dataset_json['labels'])
        if reason:
            raise SystemExit(f"ERROR ({self.__class__.__name__}): {path}: {reason}.")
        super().load_checkpoint(path)
        bcp = checkpoint['bcp']
        self.teacher.load_state_dict(bcp['teacher_weights'])
        self.bcp_teacher_initialized = bcp['teacher_initialized']
        self.bcp_iteration = bcp['iteration']
        self.bcp_stage_two_start_epoch = bcp.get('stage_two_start_epoch')
        # a checkpoint without its own restart epoch restarted where the teacher started
        self.bcp_lr_restart_epoch = bcp.get('lr_restart_epoch', self.bcp_stage_two_start_epoch)
        self.bcp_student_train_dice = bcp.get('student_train_dice')
        if 'settings' in bcp:
            self.keep_settings_of_the_checkpoint(bcp['settings'], path)
            self.label_subset_of_checkpoint = bcp['settings'].get('label_subset')
            self.keep_largest_component_classes_of_the_checkpoint(bcp['settings'])
        if self.in_stage_two() and self.bcp_stage_two_start_epoch is None:  # one decay over the run: no start kept
            self.bcp_restart_lr = False

    def keep_largest_component_classes_of_the_checkpoint(self, saved: dict) -> None:
        """The classes ``bcp_largest_component`` resolved to when the run started: "auto" reads up to
        ``LARGEST_COMPONENT_SAMPLE_CASES`` reference label maps, too long to repeat at every resume of a large
        dataset (and the labeled cases of a resumed run cannot have changed)."""
        classes = saved.get("bcp_largest_component_classes")
        if classes is None or saved.get("bcp_largest_component") != self.bcp_largest_component:
            return
        self.bcp_largest_component_classes = list(classes)
        self.print_to_log_file(f"BCP: pseudo-labels keep only their largest component for classes {classes} (as "
                               f"decided when this run started, bcp_largest_component={self.bcp_largest_component!r})")

    def keep_settings_of_the_checkpoint(self, saved: dict, source: str) -> None:
        """Continue with the settings of the stages the run was started with where this trainer's differ (say
        which). The checkpoint holds them as resolved (stage 1's length in epochs), so they are compared with this
        trainer's resolved settings."""
        kept = []
        resolved = self.bcp_settings()
        for name, before_it_existed in {**STAGE_SETTINGS, **STAGE_TWO_SETTINGS}.items():
            theirs = saved.get(name, before_it_existed)
            if theirs is None:
                continue
            ours = resolved[name]
            setattr(self, name, theirs)
            if theirs != ours:
                kept.append(f"{name} = {theirs!r} (this trainer's: {ours!r})")
        if kept:
            self.print_to_log_file(f"BCP: continuing with the settings this run started with ({source}): "
                                   f"{'; '.join(kept)}. To train with the new settings, start a new training.")


def _plain(label_or_region):
    """A class label (int) or region (tuple of ints) without numpy types, for log messages."""
    if isinstance(label_or_region, (list, tuple)):
        return tuple(int(i) for i in label_or_region)
    return int(label_or_region)


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]
