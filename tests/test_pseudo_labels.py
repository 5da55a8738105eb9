import numpy as np
import torch

from nnunetv2_bcp.bcp import keep_largest_component, pseudo_labels


def test_argmax_for_label_maps():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = 5
    logits[0, 2, 1, 1] = 5
    labels = pseudo_labels(logits)
    assert labels.shape == (1, 1, 2, 2) and labels.dtype == torch.int16
    assert labels[0, 0].tolist() == [[1, 0], [0, 2]]


def test_binary_task_thresholds_foreground_probability_at_half():
    fg_prob = torch.tensor([0.2, 0.49, 0.51, 0.9]).view(1, 1, 4)
    logits = torch.cat([torch.zeros_like(fg_prob), torch.log(fg_prob / (1 - fg_prob))], 1)  # softmax -> fg_prob
    assert pseudo_labels(logits)[0, 0].tolist() == [0, 0, 1, 1]


def test_sigmoid_per_region():
    logits = torch.tensor([[-1.0, 2.0], [3.0, -0.5]]).view(1, 2, 2)  # 2 regions, 2 voxels
    regions = pseudo_labels(logits, region_based=True)
    assert regions.dtype == torch.bool and regions.shape == (1, 2, 2)
    assert regions[0].tolist() == [[False, True], [True, False]]


def test_largest_component_per_class_2d():
    seg = torch.tensor([[1, 1, 0, 1, 0, 2],
                        [1, 1, 0, 0, 0, 0],
                        [0, 0, 0, 2, 2, 0],
                        [0, 0, 0, 2, 2, 0]], dtype=torch.int16).view(1, 1, 4, 6)
    out = keep_largest_component(seg)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 0, 2, 2, 0],
                             [0, 0, 0, 2, 2, 0]], dtype=torch.int16)
    assert out.dtype == torch.int16 and torch.equal(out[0, 0], expected)


def test_diagonal_neighbours_are_connected():
    seg = torch.zeros(1, 1, 3, 3, 3, dtype=torch.int16)
    seg[0, 0, 0, 0, 0] = seg[0, 0, 1, 1, 1] = seg[0, 0, 2, 2, 2] = 1  # one 26-connected component
    seg[0, 0, 0, 2, 0] = 1  # an isolated voxel... also a corner neighbour of (1,1,1)
    assert torch.equal(keep_largest_component(seg), seg)


def test_per_sample_3d_and_absent_class_stays_absent():
    seg = torch.zeros(2, 1, 5, 5, 5, dtype=torch.int16)
    seg[0, 0, 0:2, 0:2, 0:2] = 1  # 8 voxels
    seg[0, 0, 4, 4, 4] = 1        # stray voxel
    seg[1, 0, 4, 4, 4] = 2        # sample 1: only one tiny component of class 2, no class 1
    out = keep_largest_component(seg)
    assert out[0].sum() == 8 and out[0, 0, 4, 4, 4] == 0
    assert out[1, 0, 4, 4, 4] == 2 and (out[1] == 1).sum() == 0
    empty = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int16)
    assert torch.equal(keep_largest_component(empty), empty)


def test_regions_are_filtered_channel_by_channel():
    seg = torch.zeros(1, 2, 6, 6, dtype=torch.bool)
    seg[0, 0, 0:3, 0:3] = True
    seg[0, 0, 5, 5] = True
    seg[0, 1, 0:3, 0:3] = True  # overlapping second region, smaller than its other component
    seg[0, 1, 4:6, 0:6] = True  # 12 voxels > 9
    out = keep_largest_component(seg, region_based=True)
    assert out.dtype == torch.bool
    assert out[0, 0].sum() == 9 and not out[0, 0, 5, 5]
    assert out[0, 1].sum() == 12 and not out[0, 1, 0, 0]


def test_matches_scipy_reference_on_random_volumes():
    from scipy import ndimage
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, size=(2, 1, 12, 12, 12)).astype(np.int16)
    seg[rng.random(seg.shape) < 0.6] = 0
    out = keep_largest_component(torch.from_numpy(seg)).numpy()
    for b in range(2):
        expected = np.zeros_like(seg[b, 0])
        for c in (1, 2):
            lab, n = ndimage.label(seg[b, 0] == c, structure=np.ones((3, 3, 3)))
            if n:
                sizes = np.bincount(lab.ravel())[1:]
                expected[lab == (np.argmax(sizes) + 1)] = c
        # ties between equally large components may pick either one: compare sizes per class instead then
        for c in (1, 2):
            assert (out[b, 0] == c).sum() == (expected == c).sum()
        assert np.all((out[b, 0] == 0) | (out[b, 0] == seg[b, 0]))
