import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_bcp.bcp import (BCPRegionLoss, bcp_total, downsample_mask, inward_directions, labeled_origin,
                              masked_seg_loss, random_box_mask)

SMOOTH = 1e-5


def reference_region_loss(logits, target, region, do_bg, batch_dice, ignore_label=None):
    """Straightforward CE + soft Dice over the voxels of one region, written independently of the package."""
    valid = region.clone()
    if ignore_label is not None:
        valid &= target != ignore_label
    t = torch.where(valid, target, 0)[:, 0].long()
    probs = torch.softmax(logits.double(), 1)
    B, K = logits.shape[:2]
    onehot = torch.stack([(t == k) for k in range(K)], 1).double()
    v = valid.double()
    ce = -(torch.log(probs) * onehot).sum(1, keepdim=True)
    ce = (ce * v).sum() / v.sum()
    dims = ((0,) if batch_dice else ()) + tuple(range(2, logits.ndim))
    inter = (probs * onehot * v).sum(dims)
    denom = (probs * v).sum(dims) + (onehot * v).sum(dims)
    dice = (2 * inter + SMOOTH) / (denom + SMOOTH)
    if not do_bg:
        dice = dice[..., 1:]
    return ce - dice.mean()


@pytest.mark.parametrize("spatial", [(8, 10), (6, 8, 10)])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_masked_loss_matches_independent_computation(spatial, batch_dice):
    torch.manual_seed(0)
    B, K = 3, 4
    logits = torch.randn(B, K, *spatial, dtype=torch.float64)
    target = torch.randint(0, K, (B, 1, *spatial), dtype=torch.int16)
    region = torch.rand(B, 1, *spatial) > 0.3
    dice = MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x, 1), batch_dice=batch_dice,
                                       do_bg=False, smooth=SMOOTH, ddp=False)
    ours = masked_seg_loss(logits, target, region, dice)
    ref = reference_region_loss(logits, target, region, do_bg=False, batch_dice=batch_dice)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_ignore_label_voxels_do_not_contribute():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 6, 6), dtype=torch.int16)
    target[:, :, :2] = 3  # ignore label 3 on the first two rows
    region = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    dice = MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x, 1), batch_dice=True, do_bg=False,
                                       smooth=SMOOTH, ddp=False)
    loss = masked_seg_loss(logits, target, region, dice, ignore_label=3)
    ref = reference_region_loss(logits.detach(), target, region, False, True, ignore_label=3)
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    assert torch.all(logits.grad[:, :, :2] == 0) and torch.any(logits.grad[:, :, 2:] != 0)


def test_alpha_weighting_of_the_two_origins():
    torch.manual_seed(2)
    nn_loss = DC_and_CE_loss({'batch_dice': True, 'smooth': SMOOTH, 'do_bg': False, 'ddp': False}, {},
                             dice_class=MemoryEfficientSoftDiceLoss)
    bcp_loss = BCPRegionLoss.like_nnunet_loss(nn_loss)
    logits = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 1, 12, 12), dtype=torch.int16)
    M = random_box_mask((12, 12), 2, generator=torch.Generator().manual_seed(0))
    from_l = labeled_origin(M, inward_directions(2))
    terms = bcp_loss(logits, target, from_l)
    ref_l = reference_region_loss(logits, target, from_l, False, True)
    ref_u = reference_region_loss(logits, target, ~from_l, False, True)
    assert torch.allclose(terms, torch.stack([ref_l, ref_u]), atol=1e-6)
    assert torch.allclose(bcp_total(terms, 0.5), ref_l + 0.5 * ref_u)
    # with the region covering everything and alpha=0 the loss is nnU-Net's own loss
    everything = torch.ones_like(from_l)
    assert torch.allclose(bcp_loss(logits, target, everything)[0], nn_loss(logits, target), atol=1e-6)


def test_errors_only_in_unlabeled_region_are_damped_by_alpha():
    # perfect prediction on labeled-origin voxels, wrong on unlabeled-origin voxels
    target = torch.zeros(1, 1, 6, 6, dtype=torch.int16)
    target[..., :, :3] = 1
    from_l = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    from_l[..., :3, :] = True
    logits = torch.where(from_l, 20.0 * torch.cat([target == 0, target == 1], 1), 20.0 * torch.cat(
        [target == 1, target == 0], 1)).double()
    dice = MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x, 1), batch_dice=True, do_bg=False,
                                       smooth=SMOOTH, ddp=False)
    terms = BCPRegionLoss(dice)(logits, target, from_l)
    assert terms[0] < -0.99 and terms[1] > 10  # labeled part: Dice 1, CE 0; unlabeled part: all wrong
    assert torch.isclose(bcp_total(terms, 0.5) - terms[0], 0.5 * terms[1])


def test_region_based_with_ignore_channel():
    torch.manual_seed(3)
    nn_loss = DC_and_BCE_loss({}, {'batch_dice': True, 'do_bg': True, 'smooth': SMOOTH, 'ddp': False},
                              use_ignore_label=True, dice_class=MemoryEfficientSoftDiceLoss)
    bcp_loss = BCPRegionLoss.like_nnunet_loss(nn_loss)
    logits = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    regions = torch.rand(2, 2, 6, 6) > 0.5
    ignore = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    ignore[..., 0, :] = True
    target = torch.cat([regions, ignore], 1)
    from_l = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    from_l[..., :, :4] = True
    terms = bcp_loss(logits, target, from_l)
    for term, region in zip(terms, (from_l, ~from_l)):
        v = (region & ~ignore).double()
        p = torch.sigmoid(logits)
        t = regions.double()
        bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
        ce = (bce * v).sum() / (v.sum() * 2)
        inter = (p * t * v).sum((0, 2, 3))
        dice = (2 * inter + SMOOTH) / ((p * v).sum((0, 2, 3)) + (t * v).sum((0, 2, 3)) + SMOOTH)
        assert torch.allclose(term, ce - dice.mean(), atol=1e-6)


def test_deep_supervision_composition_uses_nnunet_weights():
    torch.manual_seed(4)
    weights = np.array([1, 0.5, 0.25, 0])
    weights = weights / weights.sum()
    nn_loss = DeepSupervisionWrapper(DC_and_CE_loss({'batch_dice': False, 'smooth': SMOOTH, 'do_bg': False,
                                                     'ddp': False}, {}, dice_class=MemoryEfficientSoftDiceLoss),
                                     weights)
    bcp_loss = BCPRegionLoss.like_nnunet_loss(nn_loss)
    assert isinstance(bcp_loss, DeepSupervisionWrapper) and bcp_loss.weight_factors == tuple(weights)
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2)]
    M = random_box_mask((16, 16), 2, stride=8, generator=torch.Generator().manual_seed(1))
    from_l = labeled_origin(M, inward_directions(2))
    logits = [torch.randn(2, 3, *s, dtype=torch.float64) for s in shapes]
    targets = [torch.randint(0, 3, (2, 1, *s), dtype=torch.int16) for s in shapes]
    masks = [downsample_mask(from_l, s) for s in shapes]
    terms = bcp_loss(logits, targets, masks)
    expected = sum(w * torch.stack([reference_region_loss(o, t, m, False, False),
                                    reference_region_loss(o, t, ~m, False, False)])
                   for w, o, t, m in zip(weights, logits, targets, masks) if w)
    assert terms.shape == (2,) and torch.allclose(terms, expected, atol=1e-6)


def test_unsupported_loss_is_refused():
    with pytest.raises(TypeError, match="DC_and_CE_loss"):
        BCPRegionLoss.like_nnunet_loss(torch.nn.MSELoss())
