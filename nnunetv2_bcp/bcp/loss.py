"""BCP's α-weighted segmentation loss, each direction on its own samples (BCP.md, "Stage 2", step 5).

A mixed batch of B samples holds ``X^in`` samples (an unlabeled box pasted into a labeled image) and ``X^out``
samples (a labeled box pasted into an unlabeled image). Each voxel came either from a labeled image (weight 1) or
from an unlabeled one (weight α, pseudo-label). As in the reference code, each direction d ∈ {in, out} with n_d > 0
samples is evaluated on its own samples; for each origin o ∈ {labeled, unlabeled}:

    term_{d,o} = weight_ce * CE_{d,o} + weight_dice * Dice_{d,o}

CE_{d,o} is averaged over the valid voxels of origin o in all samples of d; Dice_{d,o} is nnU-Net's Dice module
(its settings kept: batch Dice, background, smoothing, DDP) on the samples of d, its ``loss_mask`` restricting it
to those voxels. A term without valid voxels is 0. :class:`BCPLoss` returns ``stack([L_labeled, L_unlabeled])``
with ``L_o = Σ_d (n_d / B) term_{d,o}``, so ``L_labeled + α L_unlabeled`` (:func:`bcp_total`) is the mean of the
two directions' BCP losses weighted by their sample counts: the reference's ``L^in + L^out`` (each a
``(Dice + CE) / 2``) on nnU-Net's ``Dice + CE`` scale. Pooling each origin over both directions instead is not the
same: it matches only when the box covers half the patch (in 3D it covers 8/27).

CE is on nnU-Net's scale, so the loss does not jump at the switch from nnU-Net's loss: label maps use softmax CE
averaged over the valid voxels (``ignore_label`` excluded), as ``DC_and_CE_loss``; regions use BCE as
``DC_and_BCE_loss``: with an ignore channel (the last target channel) summed over regions and divided by the valid
voxels, without one averaged over voxels and regions.

DDP (nnU-Net's trainer sets ``ddp`` under DDP; with ``batch_dice`` from the plans): the Dice module all-gathers its
per-sample sums and adds them over the ranks, so on every rank Dice_{d,o} is the Dice over origin o's voxels in the
direction-d samples of ALL ranks, while CE_{d,o}, the validity of a term and the share n_d / B stay local (nnU-Net's
CE is local too). Example, a global batch of 2 on 2 GPUs with rank 0 holding an ``X^in`` and rank 1 an ``X^out``
sample: rank 0's in-direction Dice is over its own sample alone (rank 1 adds only masked-out zeros), and rank 0
returns that sample's in-direction terms, rank 1 its sample's out-direction terms; averaging the ranks' gradients,
DDP follows the gradient of their mean, the single-GPU loss of that batch of 2. If both ranks hold ``X^in``
samples, each rank's in-direction Dice pools all of them. The collective needs the same calls with the same shapes
on every rank, so each rank calls the module for both directions and origins on its whole batch, the other
direction's samples masked out, even without a sample of that direction; such a term is multiplied by its zero
share, never skipped, so the all-reduce in the backward pass also runs on every rank.
"""
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import nn


class BCPLoss(nn.Module):
    """Loss terms of a mixed batch: ``stack([L_labeled, L_unlabeled])`` (see the module docstring).

    The total BCP loss is ``L_labeled + alpha * L_unlabeled`` (:func:`bcp_total`). Returning both terms lets
    nnU-Net's ``DeepSupervisionWrapper`` weight and sum them over scales (it zips every argument per scale, so pass
    ``[inward] * n_scales``) while the trainer can log each one.
    """

    def __init__(self, dice_loss: nn.Module, region_based: bool = False, ignore_label: Optional[int] = None,
                 has_ignore_channel: bool = False, weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.dice_loss = dice_loss
        # nnU-Net's Dice module applies its nonlinearity (softmax / sigmoid) on each call, and BCP calls it four times
        # per scale (two origins x two directions) on the same logits: the probabilities are computed once and given
        # to a copy of the module without the nonlinearity (same settings, same all-gather under DDP)
        # (a deep copy: a shallow one would share a nonlinearity given as a module, and None would remove it from
        # nnU-Net's own loss too)
        self.dice_on_probabilities = copy.deepcopy(dice_loss)
        self.dice_on_probabilities.apply_nonlin = None
        self.region_based = region_based
        self.ignore_label = ignore_label
        self.has_ignore_channel = has_ignore_channel
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor, from_labeled: torch.Tensor,
                inward: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, C, ...); ``target`` in nnU-Net's layout (label map (B, 1, ...) or regions
        (B, R[+1 ignore], ...)); ``from_labeled`` bool (B, 1, ...): the voxel came from the labeled image;
        ``inward`` bool (B,): the sample is ``X^in`` (best on the CPU, see below). Returns
        ``stack([L_labeled, L_unlabeled])``."""
        ce_map, dice_target, valid = self._ce_map(logits, target)
        nonlinearity = self.dice_loss.apply_nonlin
        probabilities = nonlinearity(logits) if nonlinearity is not None else logits
        with torch.no_grad():  # the Dice module's one-hot target, made once for the four calls
            if dice_target.shape == probabilities.shape:
                dice_target = dice_target.to(probabilities.dtype)
            else:
                dice_target = torch.zeros_like(probabilities).scatter_(1, dice_target.long(), 1)
        # which samples go which way is decided on the host: a GPU tensor would be read back (a synchronisation)
        # for every direction at every scale; pass ``inward`` on the CPU to avoid any
        inward_on_host = inward.cpu()
        inward = inward.to(logits.device, non_blocking=True)
        batch_size = logits.shape[0]
        terms = []
        for origin in (from_labeled, ~from_labeled):
            term = 0
            for direction, on_host in ((inward, inward_on_host), (~inward, ~inward_on_host)):
                in_direction = direction.view(-1, *([1] * (logits.ndim - 1)))
                region = valid & origin & in_direction
                num_voxels = region.sum()
                ce = (ce_map * region).sum() / num_voxels.clamp_min(1)
                dice = self._direction_dice(probabilities, dice_target, region.to(probabilities.dtype), on_host)
                share = direction.sum() / batch_size * (num_voxels > 0)
                term = term + share * (self.weight_ce * ce + self.weight_dice * dice)
            terms.append(term)
        return torch.stack(terms)

    def _ce_map(self, logits: torch.Tensor, target: torch.Tensor):
        """Per-voxel CE (B, 1, ...) on nnU-Net's scale, the Dice target, and the valid voxels (B, 1, ...)."""
        if self.region_based:
            if self.has_ignore_channel:
                valid, target = ~target[:, -1:].bool(), target[:, :-1]
            else:
                valid = torch.ones_like(target[:, :1], dtype=torch.bool)
            bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
            # DC_and_BCE_loss: summed over regions per valid voxel with an ignore channel, else averaged
            ce_map = bce.sum(1, keepdim=True) if self.has_ignore_channel else bce.mean(1, keepdim=True)
            return ce_map, target, valid
        if self.ignore_label is None:
            valid = torch.ones_like(target, dtype=torch.bool)
        else:
            valid = target != self.ignore_label
            target = torch.where(valid, target, 0)  # any class: ignored voxels are masked out of CE and Dice
        ce_map = F.cross_entropy(logits, target[:, 0].long(), reduction="none").unsqueeze(1)
        return ce_map, target, valid

    def _direction_dice(self, probabilities: torch.Tensor, dice_target: torch.Tensor, region: torch.Tensor,
                        direction_on_host: torch.Tensor) -> torch.Tensor:
        dice = self.dice_on_probabilities
        if dice.batch_dice:
            # the whole batch, the other direction's samples masked out (they add zero to the batch sums): with
            # ddp the module all-gathers, which needs the same calls and shapes on every rank
            return dice(probabilities, dice_target, loss_mask=region)
        # per-sample Dice (no collective): its mean over samples must see this direction's samples only
        if not direction_on_host.any():
            return probabilities.new_zeros(())
        samples = direction_on_host.nonzero().flatten().to(probabilities.device, non_blocking=True)
        return dice(probabilities.index_select(0, samples), dice_target.index_select(0, samples),
                    loss_mask=region.index_select(0, samples))

    @classmethod
    def like_nnunet_loss(cls, nnunet_loss: nn.Module) -> nn.Module:
        """Build the BCP loss with the same Dice module, weights, ignore label and deep-supervision weights as an
        nnU-Net loss (``DC_and_CE_loss`` / ``DC_and_BCE_loss``, optionally inside ``DeepSupervisionWrapper``)."""
        inner = nnunet_loss.loss if isinstance(nnunet_loss, DeepSupervisionWrapper) else nnunet_loss
        if isinstance(inner, DC_and_CE_loss):
            loss = cls(inner.dc, region_based=False, ignore_label=inner.ignore_label,
                       weight_ce=inner.weight_ce, weight_dice=inner.weight_dice)
        elif isinstance(inner, DC_and_BCE_loss):
            loss = cls(inner.dc, region_based=True, has_ignore_channel=inner.use_ignore_label,
                       weight_ce=inner.weight_ce, weight_dice=inner.weight_dice)
        else:
            raise TypeError(f"BCP needs nnU-Net's DC_and_CE_loss or DC_and_BCE_loss, got {type(inner).__name__}; "
                            f"override _build_bcp_loss in your trainer variant for other losses")
        ce = inner.ce
        if (getattr(ce, "weight", None) is not None or getattr(ce, "pos_weight", None) is not None
                or getattr(ce, "label_smoothing", 0.0)):
            raise ValueError("BCPLoss computes plain (B)CE: class weights, pos_weight and label smoothing of the "
                             "nnU-Net loss would be dropped; override _build_bcp_loss for such a loss")
        if isinstance(nnunet_loss, DeepSupervisionWrapper):
            return DeepSupervisionWrapper(loss, nnunet_loss.weight_factors)
        return loss


def bcp_total(terms: torch.Tensor, alpha: float) -> torch.Tensor:
    """``L = L_labeled + alpha * L_unlabeled`` from the two terms of :class:`BCPLoss`."""
    return terms[0] + alpha * terms[1]

