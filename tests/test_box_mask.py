import numpy as np
import pytest
import torch

from nnunetv2_bcp.bcp import box_size, downsample_mask, random_box_mask, render_box_mask


def box_extent(mask2d_or_3d: torch.Tensor):
    """(start, size) per axis of the zero box of a single-sample mask (1, *spatial)."""
    inside = (mask2d_or_3d[0] == 0).nonzero()
    starts = inside.min(0).values.tolist()
    stops = inside.max(0).values.tolist()
    return starts, [b - a + 1 for a, b in zip(starts, stops)]


def test_render_box_mask_by_hand():
    mask = render_box_mask((4, 6), torch.tensor([[1, 2]]), (2, 3))
    expected = torch.tensor([[1, 1, 1, 1, 1, 1],
                             [1, 1, 0, 0, 0, 1],
                             [1, 1, 0, 0, 0, 1],
                             [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    assert mask.shape == (1, 1, 4, 6)
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("patch", [(96, 96), (48, 64, 80), (20, 192, 160), (5, 7)])
def test_box_side_is_two_thirds_per_axis(patch):
    assert box_size(patch) == tuple(round(2 / 3 * s) for s in patch)
    g = torch.Generator().manual_seed(0)
    mask = random_box_mask(patch, batch_size=3, generator=g)
    assert mask.shape == (3, 1, *patch)
    # one box for the whole batch (the paper's choice)
    assert torch.equal(mask[0], mask[1]) and torch.equal(mask[0], mask[2])
    starts, sizes = box_extent(mask[0])
    assert tuple(sizes) == box_size(patch)
    assert int((mask[0] == 0).sum()) == torch.tensor(box_size(patch)).prod()
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_box_positions_cover_the_patch_uniformly():
    g = torch.Generator().manual_seed(1)
    starts = [tuple(box_extent(random_box_mask((12, 12), batch_size=2, generator=g)[0])[0]) for _ in range(200)]
    # uniform position: every start from 0 to 12 - 8 = 4 appears along each axis, each about equally often
    for axis in range(2):
        counts = np.bincount([s[axis] for s in starts], minlength=5)
        assert len(counts) == 5 and counts.min() > 200 / 5 / 2


@pytest.mark.parametrize("patch,stride", [((64, 96), (8, 16)), ((40, 56, 40), (4, 8, 4)), ((32, 32, 32), 16)])
def test_aligned_box_is_exact_at_every_scale(patch, stride):
    strides = (stride,) * len(patch) if isinstance(stride, int) else stride
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        mask = random_box_mask(patch, batch_size=2, stride=stride, generator=g)
        starts, sizes = box_extent(mask[0])
        assert all(a % s == 0 for a, s in zip(starts, strides))
        assert all(z % s == 0 for z, s in zip(sizes, strides))
        for factor in [1, 2, strides]:
            f = (factor,) * len(patch) if isinstance(factor, int) else factor
            f = [min(x, s) for x, s in zip(f, strides)]
            shape = [p // x for p, x in zip(patch, f)]
            coarse = downsample_mask(mask, shape)
            direct = render_box_mask(shape, torch.tensor([[a // x for a, x in zip(starts, f)]]),
                                     [z // x for z, x in zip(sizes, f)])
            assert torch.equal(coarse[:1], direct)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="multiple of the box stride"):
        random_box_mask((30, 32), 2, stride=4)
    with pytest.raises(ValueError, match="ratio"):
        random_box_mask((32, 32), 2, ratio=1.0)
    with pytest.raises(ValueError, match="spatial axes"):
        random_box_mask((32, 32), 2, stride=(4, 4, 4))


def test_mask_is_reproducible_with_a_generator():
    a = random_box_mask((16, 16, 16), 2, generator=torch.Generator().manual_seed(5))
    b = random_box_mask((16, 16, 16), 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_masks_and_pseudo_labels_are_downsampled_as_nnunet_downsamples_its_targets():
    """The pseudo-labels and origin masks meet nnU-Net's own deep-supervision targets voxel by voxel: a random label
    map (edges off any grid) resized by downsample_mask equals batchgeneratorsv2's DownsampleSegForDSTransform."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    segmentation = torch.randint(0, 3, (1, 20, 18, 13), generator=torch.Generator().manual_seed(0)).to(torch.int16)
    scales = [[1, 1, 1], [0.5, 0.5, 1], [0.25, 0.25, 0.5]]
    theirs = DownsampleSegForDSTransform(scales)(segmentation=segmentation)["segmentation"]
    for target in theirs:
        assert torch.equal(downsample_mask(segmentation[None], target.shape[1:])[0], target)
