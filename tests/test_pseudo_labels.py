import numpy as np
import pytest
import torch

from nnunetv2_bcp.bcp import keep_largest_component, pseudo_labels, single_component_share

# the largest-component tests run both implementations: cc3d on the CPU and tensor operations (used on CUDA)
both_filters = pytest.mark.parametrize("on_device", [False, True], ids=["cc3d", "tensor_ops"])


def test_argmax_for_label_maps():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = 5
    logits[0, 2, 1, 1] = 5
    labels = pseudo_labels(logits)
    assert labels.shape == (1, 1, 2, 2) and labels.dtype == torch.int16
    assert labels[0, 0].tolist() == [[1, 0], [0, 2]]


def test_label_maps_equal_argmax_with_ties_going_to_the_first_class():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, 7, generator=generator)
    logits[:, 2] = logits[:, 1]  # ties everywhere between classes 1 and 2
    logits[0, :, 0] = 0  # and between all classes on a slice
    labels = pseudo_labels(logits)
    assert torch.equal(labels.long(), logits.argmax(dim=1, keepdim=True))
    assert (labels != 2).all() and (labels[0, 0, 0] == 0).all()


def test_binary_task_thresholds_foreground_probability_at_half():
    fg_prob = torch.tensor([0.2, 0.49, 0.51, 0.9]).view(1, 1, 4)
    logits = torch.cat([torch.zeros_like(fg_prob), torch.log(fg_prob / (1 - fg_prob))], 1)  # softmax -> fg_prob
    assert pseudo_labels(logits)[0, 0].tolist() == [0, 0, 1, 1]


def test_sigmoid_per_region():
    logits = torch.tensor([[-1.0, 2.0], [3.0, -0.5]]).view(1, 2, 2)  # 2 regions, 2 voxels
    regions = pseudo_labels(logits, region_based=True)
    assert regions.dtype == torch.bool and regions.shape == (1, 2, 2)
    assert regions[0].tolist() == [[False, True], [True, False]]


# class 1: a blob of 4 and a single pixel; class 2: a blob of 4 and a single pixel
_TWO_CLASSES_2D = torch.tensor([[1, 1, 0, 1, 0, 2],
                                [1, 1, 0, 0, 0, 0],
                                [0, 0, 0, 2, 2, 0],
                                [0, 0, 0, 2, 2, 0]], dtype=torch.int16).view(1, 1, 4, 6)


@both_filters
def test_largest_component_per_class_2d(on_device):
    seg = _TWO_CLASSES_2D.clone()
    out = keep_largest_component(seg, on_device=on_device)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 0, 2, 2, 0],
                             [0, 0, 0, 2, 2, 0]], dtype=torch.int16)
    assert out.dtype == torch.int16 and torch.equal(out[0, 0], expected)


@both_filters
def test_diagonal_neighbours_are_connected(on_device):
    seg = torch.zeros(1, 1, 3, 3, 3, dtype=torch.int16)
    seg[0, 0, 0, 0, 0] = seg[0, 0, 1, 1, 1] = seg[0, 0, 2, 2, 2] = 1  # one 26-connected component
    seg[0, 0, 0, 2, 0] = 1  # an isolated voxel... also a corner neighbour of (1,1,1)
    assert torch.equal(keep_largest_component(seg, on_device=on_device), seg)


@both_filters
def test_per_sample_3d_and_absent_class_stays_absent(on_device):
    seg = torch.zeros(2, 1, 5, 5, 5, dtype=torch.int16)
    seg[0, 0, 0:2, 0:2, 0:2] = 1  # 8 voxels
    seg[0, 0, 4, 4, 4] = 1        # stray voxel
    seg[1, 0, 4, 4, 4] = 2        # sample 1: only one tiny component of class 2, no class 1
    out = keep_largest_component(seg, on_device=on_device)
    assert out[0].sum() == 8 and out[0, 0, 4, 4, 4] == 0
    assert out[1, 0, 4, 4, 4] == 2 and (out[1] == 1).sum() == 0
    empty = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int16)
    assert torch.equal(keep_largest_component(empty, on_device=on_device), empty)


@both_filters
def test_regions_are_filtered_channel_by_channel(on_device):
    seg = torch.zeros(1, 2, 6, 6, dtype=torch.bool)
    seg[0, 0, 0:3, 0:3] = True
    seg[0, 0, 5, 5] = True
    seg[0, 1, 0:3, 0:3] = True  # overlapping second region, smaller than its other component
    seg[0, 1, 4:6, 0:6] = True  # 12 voxels > 9
    out = keep_largest_component(seg, region_based=True, on_device=on_device)
    assert out.dtype == torch.bool
    assert out[0, 0].sum() == 9 and not out[0, 0, 5, 5]
    assert out[0, 1].sum() == 12 and not out[0, 1, 0, 0]


@both_filters
def test_matches_scipy_reference_on_random_volumes(on_device):
    from scipy import ndimage
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, size=(2, 1, 12, 12, 12)).astype(np.int16)
    seg[rng.random(seg.shape) < 0.6] = 0
    out = keep_largest_component(torch.from_numpy(seg), on_device=on_device).numpy()
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


@pytest.mark.parametrize("shape", [(2, 1, 9, 17), (3, 1, 7, 8, 9), (2, 1, 24, 20, 16)])
def test_tensor_ops_filter_equals_cc3d_ties_included(shape):
    """Noise with many equally large small components: the same component must win in both implementations."""
    rng = np.random.default_rng(sum(shape))
    for num_classes, background in ((2, 0.5), (4, 0.7), (3, 0.2)):
        seg = rng.integers(0, num_classes, size=shape).astype(np.int16)
        seg[rng.random(shape) < background] = 0
        seg = torch.from_numpy(seg)
        assert torch.equal(keep_largest_component(seg, on_device=True), keep_largest_component(seg, on_device=False))
        regions = torch.from_numpy(rng.random((shape[0], 3, *shape[2:])) < 1 - background)
        assert torch.equal(keep_largest_component(regions, True, on_device=True),
                           keep_largest_component(regions, True, on_device=False))


def test_tensor_ops_filter_follows_long_winding_components():
    """A serpentine through a 3D volume (one component whose ends are hundreds of steps apart) and smooth noise."""
    seg = torch.zeros(1, 1, 5, 21, 21, dtype=torch.int16)
    for z in (0, 2, 4):
        for row in range(0, 21, 2):
            seg[0, 0, z, row] = 1  # rows joined at alternating ends, planes joined at alternating corners
            seg[0, 0, z, row + 1 if row < 20 else row, 20 if (row // 2) % 2 == 0 else 0] = 1
        seg[0, 0, z + 1 if z < 4 else z, 20, 20 if z % 4 == 0 else 0] = 1
    seg[0, 0, 4, 0, 0] = 2
    assert torch.equal(keep_largest_component(seg, on_device=True), keep_largest_component(seg, on_device=False))
    noise = torch.nn.functional.avg_pool3d(torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0)),
                                           5, stride=1, padding=2)
    labels = torch.bucketize(noise, torch.tensor([0.1, 0.2])).to(torch.int16)
    kept = keep_largest_component(labels, on_device=True)
    assert torch.equal(kept, keep_largest_component(labels, on_device=False)) and kept.any()


def test_ties_go_the_same_way_for_non_contiguous_tensors():
    """cc3d numbers components in memory order: a transposed layout must not change which tied component wins."""
    seg = torch.zeros(1, 1, 1, 4, 4, dtype=torch.int16)
    seg[0, 0, 0, 0, 3] = seg[0, 0, 0, 3, 0] = 1  # two single voxels: (0, 3) comes first in raster order
    flipped = seg.transpose(3, 4).contiguous().transpose(3, 4)  # same values, other memory order
    for on_device in (False, True):
        kept = keep_largest_component(flipped, on_device=on_device)
        assert kept[0, 0, 0, 0, 3] == 1 and kept[0, 0, 0, 3, 0] == 0


def test_component_masks_of_non_bool_maps_empty_batches_float64_and_chunks(monkeypatch):
    import importlib
    module = importlib.import_module("nnunetv2_bcp.bcp.pseudo_labels")
    maps = torch.tensor([[[2., 0, 0], [0, 0, 0], [0, 5, 1]]])  # any non-zero value is foreground
    assert module.largest_component_masks(maps).tolist() == [[[False, False, False], [False, False, False],
                                                               [False, True, True]]]
    assert module.largest_component_masks(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4, 4)
    assert keep_largest_component(torch.zeros(2, 0, 4, 4, dtype=torch.bool), True, on_device=True).shape == (2, 0, 4, 4)
    seg = torch.from_numpy(np.random.default_rng(3).integers(0, 3, size=(3, 1, 6, 7, 8)).astype(np.int16))
    expected = keep_largest_component(seg, on_device=False)
    monkeypatch.setattr(module, "FLOAT32_EXACT_VOXELS", 10)  # numbers in float64
    monkeypatch.setattr(module, "CHUNK_VOXELS", 6 * 7 * 8 * 2)  # six maps (3 samples x 2 classes) in chunks of two
    assert torch.equal(keep_largest_component(seg, on_device=True), expected)


@both_filters
def test_only_the_chosen_classes_are_filtered(on_device):
    """A class of many instances (class 2: two blobs) keeps all of them when it is not among the filtered classes."""
    seg = _TWO_CLASSES_2D.clone()
    out = keep_largest_component(seg, on_device=on_device, classes=[1])
    assert out[0, 0, 0].tolist() == [1, 1, 0, 0, 0, 2] and torch.equal(out[0, 0, 1:], seg[0, 0, 1:])
    assert torch.equal(keep_largest_component(seg, on_device=on_device, classes=[]), seg)
    regions = torch.stack([seg == 1, seg == 2], 1)[:, :, 0]  # (B, R, H, W): region 1 (class 2) not filtered
    kept = keep_largest_component(regions, region_based=True, on_device=on_device, classes=[0])
    assert torch.equal(kept[:, 1], regions[:, 1]) and kept[:, 0].sum() == 4


def test_single_component_share_per_case_and_per_slice():
    one_blob = np.zeros((3, 6, 6), np.int16)
    one_blob[:, 1:3, 1:3] = 1
    two_blobs = one_blob.copy()
    two_blobs[:, 4:6, 4:6] = 2
    two_blobs[:, 0, 5] = 2   # class 2: two blobs in every slice
    two_blobs[0, 0, 0] = -1  # outside the image: neither background nor a class
    share = single_component_share([one_blob, two_blobs], {1: [1], 2: [2], 3: [3], 4: [1, 2]})
    assert share == {1: 1.0, 2: 0.0, 3: None, 4: 0.5}
    assert single_component_share([two_blobs], {2: [2]}, per_slice=True) == {2: 0.0}
    assert single_component_share([two_blobs[:1, 4:]], {2: [2]}, per_slice=True) == {2: 1.0}
