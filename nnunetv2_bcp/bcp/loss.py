"""BCP's α-weighted segmentation loss, each direction on its own samples (BCP's stage 2).

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

DDP (nnU-Net's trainer sets ``ddp`` under DDP; with ``batch_dice`` from the plans): the Dice sums of each direction
and origin are all-gathered and added over the ranks, as nnU-Net's Dice module does with its own, so on every rank
Dice_{d,o} is the Dice over origin o's voxels in the direction-d samples of ALL ranks, while CE_{d,o}, the validity of
a term and the share n_d / B stay local (nnU-Net's CE is local too). Example, a global batch of 2 on 2 GPUs with rank 0
holding an ``X^in`` and rank 1 an ``X^out`` sample: rank 0's in-direction Dice is over its own sample alone (rank 1
adds only zeros), and rank 0 returns that sample's in-direction terms, rank 1 its sample's out-direction terms;
averaging the ranks' gradients, DDP follows the gradient of their mean, the single-GPU loss of that batch of 2. If both
ranks hold ``X^in`` samples, each rank's in-direction Dice pools all of them. The collective needs the same calls with
the same shapes on every rank: every rank gathers the sums of both directions and origins, even without a sample of a
direction; such a term is multiplied by its zero share, never skipped, so the all-reduce in the backward pass also runs
on every rank.

nnU-Net's default Dice module (``MemoryEfficientSoftDiceLoss``) is evaluated from one set of masked sums per scale
(intersection, prediction, target per sample, origin and class; one all-gather under DDP); any other Dice module is
called once per direction and origin with its ``loss_mask``.
"""
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.ddp_allgather import AllGatherGrad
from torch import nn

from nnunetv2_bcp.bcp.ema import unwrap_network


class BCPLoss(nn.Module):
    """Loss terms of a mixed batch: ``stack([L_labeled, L_unlabeled])`` (see the module docstring).

    The total BCP loss is ``L_labeled + alpha * L_unlabeled`` (:func:`bcp_total`). Returning both terms lets
    nnU-Net's ``DeepSupervisionWrapper`` weight and sum them over scales (it zips every argument per scale, so pass
    ``[inward] * n_scales``) while the trainer can log each one.
    """

    def __init__(self, dice_loss: nn.Module, region_based: bool = False, ignore_label: Optional[int] = None,
                 has_ignore_channel: bool = False, weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        # nnU-Net hands its Dice module compiled where it compiles the network (nnUNet_compile); its settings and
        # class are what this loss reads, and the sums below replace its forward pass
        dice_loss = unwrap_network(dice_loss)
        self.dice_loss = dice_loss
        # nnU-Net's default Dice is computed here from one set of sums per scale (its formula and settings); another
        # Dice module is called per direction and origin on probabilities computed once, through a copy without its
        # nonlinearity (a deep copy: a shallow one would share a nonlinearity given as a module, and None would
        # remove it from nnU-Net's own loss too)
        self.sums_nnunets_dice = (isinstance(dice_loss, MemoryEfficientSoftDiceLoss)
                                  and type(dice_loss).forward is MemoryEfficientSoftDiceLoss.forward)
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
        ``inward`` bool (B,): the sample is ``X^in``. Returns ``stack([L_labeled, L_unlabeled])``."""
        ce_map, dice_target, valid = self._ce_map(logits, target)
        nonlinearity = self.dice_loss.apply_nonlin
        probabilities = nonlinearity(logits) if nonlinearity is not None else logits
        with torch.no_grad():  # the Dice's one-hot target, made once for all directions and origins
            if dice_target.shape == probabilities.shape:
                dice_target = dice_target.to(probabilities.dtype)
            else:
                dice_target = torch.zeros_like(probabilities).scatter_(1, dice_target.long(), 1)
        directions = torch.stack([inward, ~inward], 1).to(logits.device, torch.float32, non_blocking=True)
        origins = torch.stack([from_labeled, ~from_labeled], 1) & valid.unsqueeze(1)  # (B, 2, 1, ...)
        if self.sums_nnunets_dice:
            dice = self._dice_from_sums(probabilities, dice_target, origins.to(probabilities.dtype), directions)
        else:
            dice = self._dice_by_calls(probabilities, dice_target, origins.to(probabilities.dtype), inward.cpu())
        spatial = tuple(range(3, origins.ndim))
        voxels = _by_direction(directions, origins.sum(spatial, dtype=torch.float32))[..., 0]
        ce = _by_direction(directions, (ce_map.unsqueeze(1) * origins).sum(spatial, dtype=torch.float32))[..., 0]
        ce = ce / voxels.clamp_min(1)
        share = directions.sum(0, keepdim=True).T / logits.shape[0] * (voxels > 0)  # a term without voxels is 0
        return (share * (self.weight_ce * ce + self.weight_dice * dice)).sum(0)

    def _dice_from_sums(self, probabilities: torch.Tensor, dice_target: torch.Tensor, origins: torch.Tensor,
                        directions: torch.Tensor) -> torch.Tensor:
        """-Dice (2 directions, 2 origins) with nnU-Net's ``MemoryEfficientSoftDiceLoss`` settings and formula, from
        one set of masked sums per sample and origin: a few kernels instead of four calls of the module, and under
        DDP one all-gather per scale instead of twelve."""
        dice = self.dice_loss
        first = 0 if dice.do_bg else 1
        probabilities, dice_target = probabilities[:, first:].unsqueeze(1), dice_target[:, first:].unsqueeze(1)
        spatial = tuple(range(3, origins.ndim))
        with torch.no_grad():
            sum_gt = (dice_target * origins).sum(spatial, dtype=torch.float32)
        intersect = (probabilities * dice_target * origins).sum(spatial, dtype=torch.float32)
        sum_pred = (probabilities * origins).sum(spatial, dtype=torch.float32)  # each (B, 2 origins, classes)
        if dice.batch_dice:  # the direction's samples pooled (over all ranks under DDP)
            sums = _by_direction(directions, torch.stack([intersect, sum_pred, sum_gt]).movedim(0, -1))
            if dice.ddp:
                sums = AllGatherGrad.apply(sums).sum(0)
            intersect, sum_pred, sum_gt = sums.unbind(-1)
        coefficient = (2 * intersect + dice.smooth) / (sum_gt + sum_pred + float(dice.smooth)).clamp_min(1e-8)
        if dice.batch_dice:
            return -coefficient.mean(-1)
        # per sample: the mean over the direction's samples and the classes
        return -_by_direction(directions, coefficient.mean(-1)) / directions.sum(0).clamp_min(1).unsqueeze(1)

    def _dice_by_calls(self, probabilities: torch.Tensor, dice_target: torch.Tensor, origins: torch.Tensor,
                       inward_on_host: torch.Tensor) -> torch.Tensor:
        """-Dice (2 directions, 2 origins) from a Dice module other than nnU-Net's default: called once per direction
        and origin, its ``loss_mask`` restricting it to those voxels."""
        dice = self.dice_on_probabilities
        rows = []
        for on_host in (inward_on_host, ~inward_on_host):
            row = []
            for origin in origins.unbind(1):
                if dice.batch_dice:
                    # the whole batch, the other direction's samples masked out (they add zero to the batch sums):
                    # with ddp the module all-gathers, which needs the same calls and shapes on every rank
                    in_direction = on_host.to(origin.device).view(-1, *([1] * (origin.ndim - 1)))
                    row.append(dice(probabilities, dice_target, loss_mask=origin * in_direction))
                elif not on_host.any():  # per-sample Dice (no collective) on this direction's samples only
                    row.append(probabilities.new_zeros((), dtype=torch.float32))
                else:
                    samples = on_host.nonzero().flatten().to(probabilities.device)
                    row.append(dice(probabilities.index_select(0, samples), dice_target.index_select(0, samples),
                                    loss_mask=origin.index_select(0, samples)).float())
            rows.append(torch.stack(row))
        return torch.stack(rows).float()

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


def _by_direction(directions: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """Sums over each direction's samples: (B, ...) -> (2, ...), ``directions`` (B, 2) the samples' one-hot
    direction (elementwise, not a matrix product: TF32 matmuls would round voxel counts)."""
    return (directions.view(*directions.shape, *[1] * (per_sample.ndim - 1)) * per_sample.unsqueeze(1)).sum(0)


def bcp_total(terms: torch.Tensor, alpha: float) -> torch.Tensor:
    """``L = L_labeled + alpha * L_unlabeled`` from the two terms of :class:`BCPLoss`."""
    return terms[0] + alpha * terms[1]

