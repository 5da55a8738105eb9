import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss, SoftDiceLoss
from nnunetv2.utilities.ddp_allgather import AllGatherGrad

from nnunetv2_bcp.bcp import BCPLoss, bcp_total, random_box_mask

SMOOTH = 1e-5
NUM_CLASSES, IGNORE_LABEL, NUM_REGIONS = 3, 3, 2
KINDS = ["labels", "labels+ignore", "regions", "regions+ignore"]


def nnunet_loss(kind, batch_dice, ddp=False, deep_supervision_weights=None, dice_class=MemoryEfficientSoftDiceLoss):
    """The loss as nnU-Net's trainer builds it (nnUNetTrainer._build_loss); ``dice_class`` as a trainer variant may
    change it."""
    if kind.startswith("regions"):
        loss = DC_and_BCE_loss({}, {'batch_dice': batch_dice, 'do_bg': True, 'smooth': SMOOTH, 'ddp': ddp},
                               use_ignore_label=kind.endswith("ignore"), dice_class=dice_class)
    else:
        ignore_label = IGNORE_LABEL if kind.endswith("ignore") else None
        loss = DC_and_CE_loss({'batch_dice': batch_dice, 'smooth': SMOOTH, 'do_bg': False, 'ddp': ddp}, {},
                              weight_ce=1, weight_dice=1, ignore_label=ignore_label, dice_class=dice_class)
    return loss if deep_supervision_weights is None else DeepSupervisionWrapper(loss, deep_supervision_weights)


def random_target(kind, batch_size, spatial, generator):
    """A label map (B, 1, ...) or regions (B, R[+1], ...) in nnU-Net's layout, ignored voxels on about 20%."""
    ignored = torch.rand(batch_size, 1, *spatial, generator=generator) < 0.2
    if kind.startswith("regions"):
        regions = torch.rand(batch_size, NUM_REGIONS, *spatial, generator=generator) < 0.4  # they may overlap
        return torch.cat([regions, ignored], 1) if kind.endswith("ignore") else regions
    labels = torch.randint(0, NUM_CLASSES, (batch_size, 1, *spatial), generator=generator, dtype=torch.int16)
    return torch.where(ignored, IGNORE_LABEL, labels) if kind.endswith("ignore") else labels


def num_outputs(kind):
    return NUM_REGIONS if kind.startswith("regions") else NUM_CLASSES


def origin_map(box_mask, inward):
    """The paper's mixing: X^in is labeled where M = 1, X^out where M = 0."""
    outside_box = box_mask.bool()
    return torch.where(inward.view(-1, *[1] * (box_mask.ndim - 1)), outside_box, ~outside_box)


# ------------------------------------------------------------------ an independent reference, from the paper's loss

def per_voxel_terms(logits, target, kind):
    """Probabilities, one-hot target, per-voxel CE (B, 1, ...) on nnU-Net's scale, valid voxels (B, 1, ...)."""
    x = logits.double()
    if kind.startswith("regions"):
        ignore_channel = kind.endswith("ignore")
        y = (target[:, :-1] if ignore_channel else target).double()
        valid = ~target[:, -1:] if ignore_channel else torch.ones_like(target[:, :1])
        bce = -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x))
        # nnU-Net: summed over regions per valid voxel with an ignore channel, else the mean over voxels and regions
        ce = bce.sum(1, keepdim=True) if ignore_channel else bce.mean(1, keepdim=True)
        return torch.sigmoid(x), y, ce, valid
    valid = target != IGNORE_LABEL if kind.endswith("ignore") else torch.ones_like(target, dtype=torch.bool)
    labels = torch.where(valid, target, 0)
    y = torch.cat([labels == k for k in range(x.shape[1])], 1).double()
    ce = -(y * torch.log_softmax(x, 1)).sum(1, keepdim=True)
    return torch.softmax(x, 1), y, ce, valid


def plain_soft_dice(probs, onehot, mask, batch_dice):
    """-mean soft Dice with nnU-Net's formula (2 tp + s) / (2 tp + fp + fn + s), over the masked voxels."""
    dims = ((0,) if batch_dice else ()) + tuple(range(2, probs.ndim))
    intersect = (probs * onehot * mask).sum(dims)
    denominator = (probs * mask).sum(dims) + (onehot * mask).sum(dims)
    return -((2 * intersect + SMOOTH) / (denominator + SMOOTH)).mean()


def reference_bcp_terms(logits, target, from_labeled, inward, kind, batch_dice, weight_ce=1.0, weight_dice=1.0,
                        other_ranks=()):
    """``[L_labeled, L_unlabeled]``: each direction on its own samples; a region's CE over its valid voxels of
    all the direction's samples, its Dice over those voxels only; direction d weighs n_d / B. ``other_ranks``:
    (logits, target, from_labeled, inward) of other DDP ranks, whose direction-d samples join direction d's
    (batch) Dice only."""
    first_dice_channel = 1 if kind.startswith("labels") else 0  # nnU-Net: do_bg False for labels, True for regions
    ranks = [(*per_voxel_terms(lg, t, kind), f, i) for lg, t, f, i in [(logits, target, from_labeled, inward),
                                                                         *other_ranks]]
    probs, onehot, ce, valid, _, _ = ranks[0]
    terms = []
    for labeled in (True, False):
        total = torch.zeros((), dtype=torch.float64)
        for direction in (True, False):
            own = inward == direction
            mask = (valid & (from_labeled == labeled))[own].double()
            if mask.sum() == 0:
                continue
            region_ce = (ce[own] * mask).sum() / mask.sum()
            samples = [(p[i == direction], y[i == direction], (v & (f == labeled))[i == direction].double())
                       for p, y, _, v, f, i in ranks]
            p, y, m = (torch.cat(parts) for parts in zip(*samples))
            dice = plain_soft_dice(p[:, first_dice_channel:], y[:, first_dice_channel:], m, batch_dice)
            total = total + own.sum() / len(inward) * (weight_ce * region_ce + weight_dice * dice)
        terms.append(total)
    return torch.stack(terms)


def pooled_reference_terms(logits, target, from_labeled, kind, batch_dice):
    """Each origin pooled over the whole batch, both directions together (not the paper's per-direction loss)."""
    both = torch.ones(logits.shape[0], dtype=torch.bool)
    return reference_bcp_terms(logits, target, from_labeled, both, kind, batch_dice)


def mixed_batch(kind, spatial, inward, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(inward)
    logits = torch.randn(batch_size, num_outputs(kind), *spatial, generator=generator, dtype=dtype)
    target = random_target(kind, batch_size, spatial, generator)
    from_labeled = origin_map(random_box_mask(spatial, batch_size, generator=generator), inward)
    return logits.requires_grad_(), target, from_labeled


def random_inward(batch_size, num_in, seed):
    return torch.randperm(batch_size, generator=torch.Generator().manual_seed(seed)) < num_in


def assert_terms_and_gradients_match(ours, reference, logits):
    assert torch.allclose(ours.double(), reference, rtol=1e-5, atol=1e-6), (ours, reference)
    for k in range(2):
        grad_ours, = torch.autograd.grad(ours[k], logits, retain_graph=True)
        grad_ref, = torch.autograd.grad(reference[k], logits, retain_graph=True)
        assert torch.allclose(grad_ours, grad_ref, rtol=1e-5, atol=1e-8), f"gradient of term {k}"


# ------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_size,num_in", [(1, 0), (1, 1), (2, 0), (2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("spatial", [(8, 12), (6, 6, 9)])
def test_matches_reference_values_and_gradients(spatial, batch_dice, batch_size, num_in, kind):
    seed = 17 * batch_size + num_in
    inward = random_inward(batch_size, num_in, seed)
    logits, target, from_labeled = mixed_batch(kind, spatial, inward, seed)
    ours = BCPLoss.like_nnunet_loss(nnunet_loss(kind, batch_dice))(logits, target, from_labeled, inward)
    reference = reference_bcp_terms(logits, target, from_labeled, inward, kind, batch_dice)
    assert_terms_and_gradients_match(ours, reference, logits)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_size,num_in", [(1, 0), (2, 1), (3, 2)])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_another_dice_module_is_called_per_direction_and_origin(batch_dice, batch_size, num_in, kind):
    """nnU-Net's default Dice is computed from the loss's own sums; a trainer variant's other Dice module (here
    nnU-Net's SoftDiceLoss) is called as it is, with the same terms."""
    seed = 7 * batch_size + num_in
    inward = random_inward(batch_size, num_in, seed)
    logits, target, from_labeled = mixed_batch(kind, (6, 6, 9), inward, seed)
    bcp = BCPLoss.like_nnunet_loss(nnunet_loss(kind, batch_dice, dice_class=SoftDiceLoss))
    assert not bcp.sums_nnunets_dice
    reference = reference_bcp_terms(logits, target, from_labeled, inward, kind, batch_dice)
    assert_terms_and_gradients_match(bcp(logits, target, from_labeled, inward), reference, logits)


@pytest.mark.parametrize("kind", KINDS)
def test_nnunets_dice_compiled_by_nnunet_is_still_computed_from_the_loss_sums(kind):
    """nnU-Net compiles its loss's Dice module where it compiles the network (nnUNet_compile): the loss still
    recognises nnU-Net's default Dice behind the wrapper and computes it from its own sums, with the same terms."""
    inward = random_inward(3, 1, 5)
    logits, target, from_labeled = mixed_batch(kind, (6, 6, 9), inward, 5)
    loss = nnunet_loss(kind, True)
    inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
    inner.dc = torch.compile(inner.dc)  # as nnUNetTrainer._build_loss does; never called here
    bcp = BCPLoss.like_nnunet_loss(loss)
    assert bcp.sums_nnunets_dice
    reference = reference_bcp_terms(logits, target, from_labeled, inward, kind, True)
    assert_terms_and_gradients_match(bcp(logits, target, from_labeled, inward), reference, logits)


@pytest.mark.parametrize("kind", ["labels", "regions"])
def test_a_nonlinearity_given_as_a_module_stays_in_nnunets_loss(kind):
    """BCPLoss computes the Dice module's nonlinearity once and calls a copy without it: nnU-Net's own loss (used for
    stage 1 and validation) keeps its nonlinearity, also where it is a module, and the terms are unchanged."""
    loss = nnunet_loss(kind, batch_dice=True)
    module = torch.nn.Softmax(dim=1) if kind == "labels" else torch.nn.Sigmoid()
    loss.dc.apply_nonlin = module
    inward = random_inward(2, 1, 3)
    logits, target, from_labeled = mixed_batch(kind, (6, 6, 9), inward, 3)
    ours = BCPLoss.like_nnunet_loss(loss)(logits, target, from_labeled, inward)
    assert loss.dc.apply_nonlin is module
    reference = reference_bcp_terms(logits, target, from_labeled, inward, kind, True)
    assert_terms_and_gradients_match(ours, reference, logits)


def test_ce_and_dice_weights():
    inward = torch.tensor([False, True, False])
    logits, target, from_labeled = mixed_batch("labels+ignore", (8, 8), inward, seed=5)
    ours = BCPLoss(nnunet_loss("labels", True).dc, ignore_label=IGNORE_LABEL, weight_ce=0.3, weight_dice=1.7)(
        logits, target, from_labeled, inward)
    reference = reference_bcp_terms(logits, target, from_labeled, inward, "labels+ignore", True, 0.3, 1.7)
    assert_terms_and_gradients_match(ours, reference, logits)


def test_per_direction_differs_from_pooling_each_origin_over_the_batch():
    # 3D, box side 2/3: the box holds 8/27 of a patch. The X^in sample is predicted well, the X^out one is not,
    # so pooling (which weighs X^in's labeled voxels 19 : 8 against X^out's) gives a clearly lower labeled term.
    inward = torch.tensor([True, False])
    logits, target, from_labeled = mixed_batch("labels", (9, 9, 9), inward, seed=3)
    onehot = torch.cat([target == k for k in range(NUM_CLASSES)], 1)
    with torch.no_grad():
        logits[0] += 4.0 * onehot[0]
    ours = BCPLoss.like_nnunet_loss(nnunet_loss("labels", True))(logits, target, from_labeled, inward)
    per_direction = reference_bcp_terms(logits, target, from_labeled, inward, "labels", True)
    pooled = pooled_reference_terms(logits, target, from_labeled, "labels", True)
    assert torch.allclose(ours.double(), per_direction, atol=1e-6)
    assert (per_direction - pooled).abs().min() > 0.05, (per_direction, pooled)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("direction", [True, False])
def test_one_direction_labeled_everywhere_is_nnunets_loss(kind, batch_dice, deep_supervision, direction):
    """With every sample of one direction and every voxel from the labeled image, the labeled term is
    nnU-Net's own loss (same scale) and the unlabeled term is 0."""
    generator = torch.Generator().manual_seed(11)
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2)] if deep_supervision else [(16, 16)]
    weights = np.array([1 / 2 ** i for i in range(len(shapes))])
    weights[-1] = 0 if deep_supervision else weights[-1]
    weights = weights / weights.sum()  # as nnUNetTrainer._build_loss
    nnunet = nnunet_loss(kind, batch_dice, deep_supervision_weights=weights if deep_supervision else None)
    bcp = BCPLoss.like_nnunet_loss(nnunet)
    batch_size = 3
    inward = torch.full((batch_size,), direction)
    logits = [torch.randn(batch_size, num_outputs(kind), *s, generator=generator).requires_grad_() for s in shapes]
    targets = [random_target(kind, batch_size, s, generator) for s in shapes]
    everywhere = [torch.ones(batch_size, 1, *s, dtype=torch.bool) for s in shapes]
    if deep_supervision:
        assert isinstance(bcp, DeepSupervisionWrapper) and bcp.weight_factors == tuple(weights)
        terms, expected = bcp(logits, targets, everywhere, [inward] * len(shapes)), nnunet(logits, targets)
    else:
        terms, expected = bcp(logits[0], targets[0], everywhere[0], inward), nnunet(logits[0], targets[0])
    assert torch.allclose(terms[0], expected, rtol=1e-5, atol=1e-6) and terms[1] == 0
    grads = torch.autograd.grad(terms[0], logits, retain_graph=True, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, logits, allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads):
        assert (grad is None) == (expected_grad is None)  # the scale of weight 0 is not evaluated at all
        assert grad is None or torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_deep_supervision_sums_the_scales_with_nnunets_weights():
    weights = np.array([1, 0.5, 0.25, 0])
    weights = weights / weights.sum()
    bcp = BCPLoss.like_nnunet_loss(nnunet_loss("labels", False, deep_supervision_weights=weights))
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2)]
    inward = torch.tensor([False, True, True])
    batches = [mixed_batch("labels", s, inward, seed) for seed, s in enumerate(shapes)]
    logits, targets, origins = (list(parts) for parts in zip(*batches))
    terms = bcp(logits, targets, origins, [inward] * len(shapes))
    expected = sum(w * reference_bcp_terms(lg, t, f, inward, "labels", False)
                   for w, lg, t, f in zip(weights, logits, targets, origins) if w)
    assert terms.shape == (2,) and torch.allclose(terms.double(), expected, atol=1e-6)


def test_ignored_voxels_get_no_gradient():
    inward = torch.tensor([True, False])
    logits, target, from_labeled = mixed_batch("labels", (6, 6), inward, seed=1)
    target[:, :, :2] = IGNORE_LABEL
    bcp = BCPLoss.like_nnunet_loss(nnunet_loss("labels+ignore", True))
    bcp_total(bcp(logits, target, from_labeled, inward), 0.5).backward()
    assert torch.all(logits.grad[:, :, :2] == 0) and torch.all(logits.grad[:, :, 2:].abs().sum(1) > 0)


def test_errors_only_in_the_unlabeled_origin_are_damped_by_alpha():
    # perfect prediction on labeled-origin voxels, wrong on unlabeled-origin voxels
    target = torch.zeros(2, 1, 6, 6, dtype=torch.int16)
    target[..., :, :3] = 1
    inward = torch.tensor([True, False])
    from_labeled = origin_map(torch.ones(2, 1, 6, 6).index_fill_(2, torch.arange(3), 0), inward)
    right = torch.cat([target == 0, target == 1], 1)
    logits = 20.0 * torch.where(from_labeled, right, ~right).double()
    terms = BCPLoss.like_nnunet_loss(nnunet_loss("labels", True))(logits, target, from_labeled, inward)
    assert terms[0] < -0.99 and terms[1] > 10  # labeled part: Dice 1, CE 0; unlabeled part: all wrong
    assert torch.isclose(bcp_total(terms, 0.5) - terms[0], 0.5 * terms[1])


def test_unsupported_losses_are_refused():
    with pytest.raises(TypeError, match="DC_and_CE_loss"):
        BCPLoss.like_nnunet_loss(torch.nn.MSELoss())
    weighted = DC_and_CE_loss({'batch_dice': True, 'smooth': SMOOTH, 'do_bg': False, 'ddp': False},
                              {'weight': torch.ones(3)}, dice_class=MemoryEfficientSoftDiceLoss)
    with pytest.raises(ValueError, match="class weights"):
        BCPLoss.like_nnunet_loss(weighted)


# ------------------------------------------------------------------ DDP: nnU-Net's batch Dice all-gathers its sums

DDP_SCENARIOS = {  # inward per rank; every rank holds the same number of samples, as in nnU-Net with an even batch
    "one sample per rank": ([True], [False]),
    "in-direction pooled over the ranks": ([True, False], [True, True]),
}


def ddp_rank_batch(scenario, rank):
    inward = torch.tensor(DDP_SCENARIOS[scenario][rank])
    return (*mixed_batch("labels", (6, 8), inward, seed=100 * rank + len(scenario)), inward)


DICE_CLASSES = {"nnU-Net's default": MemoryEfficientSoftDiceLoss, "SoftDiceLoss": SoftDiceLoss}


def _ddp_rank_main(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    gathers = []
    gather = AllGatherGrad.apply
    AllGatherGrad.apply = lambda *args: gathers.append(1) or gather(*args)  # counted in this process only
    try:
        results = {}
        for dice_name, dice_class in DICE_CLASSES.items():
            bcp = BCPLoss.like_nnunet_loss(nnunet_loss("labels", batch_dice=True, ddp=True, dice_class=dice_class))
            for scenario in DDP_SCENARIOS:
                logits, target, from_labeled, inward = ddp_rank_batch(scenario, rank)
                gathers.clear()
                terms = bcp(logits, target, from_labeled, inward)
                bcp_total(terms, 0.5).backward()
                results[dice_name, scenario] = (terms.detach(), logits.grad, len(gathers))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_batch_dice_pools_each_direction_over_the_ranks(tmp_path):
    context = mp.spawn(_ddp_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP loss hung (collective calls differ between the ranks)")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for (dice_name, scenario), (_, _, gathers) in results[0].items():
        # nnU-Net's default Dice: one all-gather of all the sums; another module: its own three per call, four calls
        assert gathers == (1 if dice_name == "nnU-Net's default" else 12), (dice_name, scenario, gathers)
    for dice_name, scenario in results[0]:
        batches = [ddp_rank_batch(scenario, rank) for rank in (0, 1)]
        # each rank: its own CE and shares, the direction's Dice over the direction's samples of both ranks
        expected = [reference_bcp_terms(*batches[rank], "labels", True, other_ranks=[batches[1 - rank]])
                    for rank in (0, 1)]
        for rank in (0, 1):
            terms, grad, _ = results[rank][dice_name, scenario]
            assert torch.isfinite(terms).all()
            assert torch.allclose(terms.double(), expected[rank], atol=1e-6), (dice_name, scenario, rank)
            # backward all-reduces through the Dice: a rank's logits get the gradient of the sum of both ranks'
            # losses (DDP then averages the parameter gradients: the gradient of the ranks' mean loss)
            expected_grad, = torch.autograd.grad(sum(bcp_total(e, 0.5) for e in expected), batches[rank][0],
                                                 retain_graph=True)
            assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-8), (dice_name, scenario, rank)
    # one sample per rank: rank 0 returns its X^in sample's in-direction terms alone, rank 1 its X^out sample's
    alone = [reference_bcp_terms(*ddp_rank_batch("one sample per rank", rank), "labels", True) for rank in (0, 1)]
    for rank in (0, 1):
        for dice_name in DICE_CLASSES:
            assert torch.allclose(results[rank][dice_name, "one sample per rank"][0].double(), alone[rank], atol=1e-6)
