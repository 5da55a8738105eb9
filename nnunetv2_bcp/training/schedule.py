"""The learning-rate schedule of a two-stage training: nnU-Net's poly decay, restarted when stage 2 begins."""
from typing import Callable, NamedTuple, Optional

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler


class TrainingStages(NamedTuple):
    """Where a two-stage training stands, as its schedule needs it."""
    restart: bool  # the learning rate restarts after stage 1
    stage_one_epochs: int  # the planned length of stage 1
    restart_epoch: Optional[int]  # the epoch the learning rate restarted at; None before


class StagedPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's ``PolyLRScheduler``, stepped with the epoch as nnU-Net does, in two stages when ``stages()`` says
    ``restart``: stage 1 decays from ``initial_lr`` over its ``stage_one_epochs`` (staying at its last value until
    the restart), then the decay starts from ``initial_lr`` again, from the epoch of the restart (``restart_epoch``:
    where stage 2 begins, or where stage 1 goes on while the student misses a class) to ``max_steps`` (nnU-Net's
    ``num_epochs``). Without ``restart``, one decay over ``max_steps``, as nnU-Net's.
    ``stages`` is asked at every step, so the schedule follows the trainer's settings as a resume restores them.

    With a restart, one training follows the schedule of a labeled-only nnU-Net model trained to its end and then
    continued with a fresh schedule: the two-command recipe, in one run."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, stages: Callable[[], TrainingStages],
                 exponent: float = 0.9):
        self.stages = stages
        super().__init__(optimizer, initial_lr, max_steps, exponent)

    def decay_position(self, epoch: int) -> float:
        """How far into its decay ``epoch`` is, from 0 (``initial_lr``) towards 1."""
        restart, stage_one_epochs, restart_epoch = self.stages()
        if not restart:
            return epoch / self.max_steps
        if restart_epoch is None:
            return min(epoch, max(stage_one_epochs - 1, 0)) / max(stage_one_epochs, 1)
        return (epoch - restart_epoch) / max(self.max_steps - restart_epoch, 1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        super().step(self.decay_position(current_step) * self.max_steps)  # nnU-Net's formula at that position
