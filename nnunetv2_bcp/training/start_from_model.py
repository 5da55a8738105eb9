"""``nnUNetv2_bcp_start_from_model``: continue an existing nnU-Net model with another trainer, BCP included.

nnU-Net's ``-pretrained_weights`` leaves the segmentation heads out, is loaded by ``run_training`` itself (the trainer
never sees the path) and cannot be combined with ``--c``. This command instead writes the starting checkpoint of the
new training: ALL weights of the given model, epoch 0 and a fresh optimiser; for BCP trainers the teacher holds the
same weights and stage 2 starts at the first epoch (the model is the converged stage 1 that the BCP paper
pre-trains). ``nnUNetv2_train ... --c`` then trains the trainer's own schedule (``num_epochs``, ``initial_lr``) from
there, and resumes from its own checkpoints after an interruption, as any nnU-Net training does.

    nnUNetv2_bcp_start_from_model DATASET CONFIGURATION FOLD -tr nnUNetTrainerBCP -m MODEL/fold_0/checkpoint_final.pth
    nnUNetv2_train DATASET CONFIGURATION FOLD -tr nnUNetTrainerBCP --c
"""
import argparse
import glob
import os

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, maybe_mkdir_p, save_json

from nnunetv2_bcp.bcp import unwrap_network
from nnunetv2_bcp.training.checkpoint import (UnreadableCheckpointError, UntrustedCheckpointError, incompatibility,
                                              load_checkpoint, load_checkpoint_without_code)

STARTING_CHECKPOINT = "checkpoint_latest.pth"  # what nnUNetv2_train --c picks up when no final checkpoint exists
STARTED_FROM_MODEL_FILE = "bcp_started_from_model.json"


class ContinueOnlyWhereStartedFromModel:
    """Refuses ``nnUNetv2_train`` without ``--c`` in an output folder prepared by ``nnUNetv2_bcp_start_from_model``:
    nnU-Net would train from random weights and overwrite the starting checkpoint. (The plugin's trainers only:
    nnU-Net's own trainers cannot be guarded.)"""
    continued_from_checkpoint = False

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self.continued_from_checkpoint = True

    def on_train_start(self):
        self.check_not_restarting_a_started_model()
        super().on_train_start()

    def check_not_restarting_a_started_model(self) -> None:
        record = join(self.output_folder, STARTED_FROM_MODEL_FILE)
        if not self.continued_from_checkpoint and isfile(record):
            raise SystemExit(f"ERROR ({self.__class__.__name__}): {self.output_folder} was prepared by "
                             f"nnUNetv2_bcp_start_from_model ({record}): continue it with nnUNetv2_train ... --c. "
                             f"Without --c nnU-Net would start from random weights and overwrite the starting "
                             f"checkpoint; to train from scratch, remove that folder first.")


def start_from_model(trainer, model_checkpoint: str, allow_pickle: bool = False) -> str:
    """Write ``trainer``'s starting checkpoint from all weights of ``model_checkpoint``; return its path.

    Refuses (SystemExit with the reason) a model of other plans, configuration or labels, an output folder that
    already holds checkpoints (work that would be overwritten) and, unless ``allow_pickle``, a file that holds more
    than weights and numbers (unpickling it could run code)."""
    name = trainer.__class__.__name__
    if not os.path.isfile(model_checkpoint):
        raise SystemExit(f"ERROR ({name}): {model_checkpoint}: no such checkpoint")
    existing = sorted(glob.glob(join(glob.escape(trainer.output_folder), "checkpoint_*.pth")))
    if existing:
        raise SystemExit(f"ERROR ({name}): {trainer.output_folder} already holds "
                         f"{[os.path.basename(f) for f in existing]}; continue it with nnUNetv2_train ... --c, or "
                         f"remove them to start again from the model")
    try:
        load = load_checkpoint if allow_pickle else load_checkpoint_without_code
        checkpoint = load(model_checkpoint)
    except UntrustedCheckpointError as e:
        raise SystemExit(f"ERROR ({name}): {e}. Only if you trust where it comes from, pass --allow_pickle.")
    except UnreadableCheckpointError as e:
        raise SystemExit(f"ERROR ({name}): {e}")
    reason = incompatibility(checkpoint, trainer.plans_manager.plans_name, trainer.configuration_name,
                             trainer.dataset_json['labels'])
    if reason:
        raise SystemExit(f"ERROR ({name}): cannot start from {model_checkpoint}: {reason}.")
    trainer.initialize()
    network = unwrap_network(trainer.network)
    try:
        network.load_state_dict(checkpoint['network_weights'])
    except RuntimeError as e:
        raise SystemExit(f"ERROR ({name}): the network in {model_checkpoint} does not match this configuration's: {e}")
    teacher = getattr(trainer, 'teacher', None)
    if teacher is not None:
        teacher.load_state_dict(network.state_dict())
        trainer.bcp_teacher_initialized = True
        trainer.bcp_stage_two_start_epoch = trainer.bcp_lr_restart_epoch = 0
    trainer.current_epoch = -1  # nnU-Net stores the epoch to continue with as current_epoch + 1
    maybe_mkdir_p(trainer.output_folder)
    path = join(trainer.output_folder, STARTING_CHECKPOINT)
    trainer.save_checkpoint(path)
    save_json({"model": model_checkpoint, "trainer": name}, join(trainer.output_folder, STARTED_FROM_MODEL_FILE))
    trainer.print_to_log_file(f"Starting checkpoint written from all weights of {model_checkpoint}"
                              + ("; BCP starts in stage 2 with this model as teacher" if teacher is not None else ""))
    return path


def main():
    from nnunetv2.run.run_training import get_trainer_from_args
    parser = argparse.ArgumentParser(description="Write the starting checkpoint of a training that continues an "
                                                 "existing nnU-Net model with all its weights (BCP: as student and "
                                                 "teacher, straight into stage 2); then run nnUNetv2_train ... --c.")
    parser.add_argument("dataset_name_or_id")
    parser.add_argument("configuration")
    parser.add_argument("fold", help="fold number or 'all'")
    parser.add_argument("-tr", default="nnUNetTrainerBCP", help="trainer of the new training [nnUNetTrainerBCP]")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier [nnUNetPlans]")
    parser.add_argument("-m", "--model", required=True,
                        help="checkpoint of the model to start from, e.g. .../fold_0/checkpoint_final.pth")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="load a checkpoint that holds pickled Python objects (can run code: trusted files only)")
    args = parser.parse_args()
    fold = args.fold if args.fold == "all" else int(args.fold)
    # writing weights needs no accelerator; nnUNetv2_train --c moves everything to its own device
    trainer = get_trainer_from_args(args.dataset_name_or_id, args.configuration, fold, args.tr, args.p,
                                    device=torch.device('cpu'))
    path = start_from_model(trainer, os.path.abspath(args.model), args.allow_pickle)
    print(f"Wrote {path}. Train with: nnUNetv2_train {args.dataset_name_or_id} {args.configuration} {args.fold} "
          f"-tr {args.tr} -p {args.p} --c")


if __name__ == "__main__":
    main()
