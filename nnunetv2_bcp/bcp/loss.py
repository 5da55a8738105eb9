"""BCP's α-weighted segmentation loss over the labeled-origin and unlabeled-origin regions (BCP.md, step 5).

With the reference semantics: each region's CE is averaged over that region's voxels and its Dice is computed
over that region's voxels only; the labeled-origin term weighs 1 and the unlabeled-origin term ``alpha``.
``X^in`` and ``X^out`` samples share one batch, so each region is pooled over the batch; this equals the
reference's ``L^in + L^out`` (each a ``(Dice + CE) / 2``) when both directions contribute alike, and it keeps
nnU-Net's ``Dice + CE`` scale and its Dice settings (batch Dice, background, smoothing, DDP).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import nn


def masked_seg_loss(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor, dice_loss: nn.Module,
                    region_based: bool = False, ignore_label: Optional[int] = None, has_ignore_channel: bool = False,
                    weight_ce: float = 1.0, weight_dice: float = 1.0) -> torch.Tensor:
    """``weight_ce * CE + weight_dice * Dice`` restricted to the voxels where ``region`` (B, 1, ...) is True.

    Label maps: ``target`` (B, 1, ...) with class indices, CE = softmax cross-entropy, voxels equal to
    ``ignore_label`` excluded. Regions: ``target`` (B, R, ...) binary, CE = binary cross-entropy averaged over
    voxels and channels; with ``has_ignore_channel`` the last target channel marks ignored voxels (nnU-Net's
    layout). ``dice_loss`` is nnU-Net's Dice module (its ``loss_mask`` restricts it to the region).
    """
    if region_based:
        if has_ignore_channel:
            valid = region & ~target[:, -1:].bool()
            target = target[:, :-1]
        else:
            valid = region
        valid_f = valid.to(logits.dtype)
        ce_map = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        ce = (ce_map * valid_f).sum() / (valid_f.sum() * logits.shape[1]).clamp_min(1)
        dice_target = target
    else:
        valid = region if ignore_label is None else region & (target != ignore_label)
        valid_f = valid.to(logits.dtype)
        dice_target = torch.where(valid, target, torch.zeros_like(target))
        ce_map = F.cross_entropy(logits, dice_target[:, 0].long(), reduction="none")
        ce = (ce_map * valid_f[:, 0]).sum() / valid_f.sum().clamp_min(1)
    dice = dice_loss(logits, dice_target, loss_mask=valid_f)
    return weight_ce * ce + weight_dice * dice


class BCPRegionLoss(nn.Module):
    """Loss terms on the two origins of a mixed batch: returns ``stack([L_labeled, L_unlabeled])``.

    The total BCP loss is ``L_labeled + alpha * L_unlabeled`` (:func:`bcp_total`). Returning both terms lets
    nnU-Net's ``DeepSupervisionWrapper`` weight and sum them over scales while the trainer can log each one.
    """

    def __init__(self, dice_loss: nn.Module, region_based: bool = False, ignore_label: Optional[int] = None,
                 has_ignore_channel: bool = False, weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.dice_loss = dice_loss
        self.seg_loss_kwargs = dict(region_based=region_based, ignore_label=ignore_label,
                                    has_ignore_channel=has_ignore_channel, weight_ce=weight_ce,
                                    weight_dice=weight_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, from_labeled: torch.Tensor) -> torch.Tensor:
        kwargs = dict(dice_loss=self.dice_loss, **self.seg_loss_kwargs)
        return torch.stack([masked_seg_loss(logits, target, from_labeled, **kwargs),
                            masked_seg_loss(logits, target, ~from_labeled, **kwargs)])

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
        if isinstance(nnunet_loss, DeepSupervisionWrapper):
            return DeepSupervisionWrapper(loss, nnunet_loss.weight_factors)
        return loss


def bcp_total(region_terms: torch.Tensor, alpha: float) -> torch.Tensor:
    """``L = L_labeled + alpha * L_unlabeled`` from the two terms of :class:`BCPRegionLoss`."""
    return region_terms[0] + alpha * region_terms[1]
