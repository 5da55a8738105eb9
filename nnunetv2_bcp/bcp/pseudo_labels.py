"""Pseudo-labels from teacher logits, with optional largest-connected-component filtering (BCP's stage 2)."""
from typing import Dict, Iterable, Optional, Sequence

import cc3d
import numpy as np
import torch
import torch.nn.functional as F


def pseudo_labels(logits: torch.Tensor, region_based: bool = False) -> torch.Tensor:
    """Hard pseudo-labels from logits (B, K, ...).

    Label maps (softmax training): argmax over classes, returned as (B, 1, ...) int16 like nnU-Net's targets
    (for two classes this is the foreground probability thresholded at 0.5). Regions (sigmoid training):
    ``sigmoid > 0.5`` per channel, i.e. ``logit > 0``, returned as bool (B, R, ...) like nnU-Net's region targets.
    """
    if region_based:
        return logits > 0
    # max(dim).indices is argmax with the same rule for ties (the first maximum), and several times faster than
    # argmax over the channel axis on the CPU (docs/benchmarks.md, "Cost of a stage-2 step on this CPU")
    return logits.max(dim=1, keepdim=True).indices.to(torch.int16)


def _largest_component_per_label(labels: np.ndarray) -> np.ndarray:
    """Keep, for every non-zero value of ``labels`` (2D or 3D), only its largest connected component."""
    connectivity = 26 if labels.ndim == 3 else 8  # full connectivity, as skimage's default in the reference code
    components = cc3d.connected_components(labels, connectivity=connectivity)
    flat_components, flat_labels = components.ravel(), labels.ravel()
    sizes = np.bincount(flat_components)
    label_of_component = np.zeros(len(sizes), dtype=labels.dtype)
    label_of_component[flat_components] = flat_labels
    keep = np.zeros(len(sizes), dtype=bool)
    for value in np.unique(label_of_component[1:]):
        ids = np.flatnonzero(label_of_component == value)
        ids = ids[ids > 0]
        keep[ids[np.argmax(sizes[ids])]] = True
    return np.where(keep[components], labels, np.zeros_like(labels))


# max-pooling takes floating point only; float32 holds every voxel number exactly up to 2**24
FLOAT32_EXACT_VOXELS = 2 ** 24
# maps filtered at once on the device: bounds the working memory (about 60 bytes per voxel of a chunk)
CHUNK_VOXELS = 2 ** 24


def _label_components(fg: torch.Tensor, spatial: tuple) -> torch.Tensor:
    """Float (N, V) of 0/1 foreground -> long (N, V): per foreground voxel the flat index of the largest voxel of its
    component (its root); a background voxel gets its own index (a slot no foreground voxel's root uses)."""
    n, voxels = fg.shape
    pool = F.max_pool3d if len(spatial) == 3 else F.max_pool2d
    own = torch.arange(voxels, device=fg.device)
    ids = (own + 1).to(fg.dtype).view(1, voxels) * fg  # 1 + flat index on the foreground, 0 on the background
    foreground = fg.bool()

    def named(numbers):  # the voxel a number names; the background names itself (no pile-up of atomics on one slot)
        return torch.where(foreground, numbers.long() - 1, own)

    while True:  # ends: numbers only grow (ids[w] >= w + 1 on the foreground) and are bounded by the voxel count
        before = ids
        for _ in range(2):  # rounds between checks: a check reads a flag back from the device
            largest_neighbour = pool(ids.view(n, 1, *spatial), 3, stride=1, padding=1).view(n, voxels) * fg
            ids = ids.scatter_reduce(1, named(ids), largest_neighbour, reduce="amax")
            ids = torch.maximum(ids, largest_neighbour)
            for _ in range(2):
                ids = ids.gather(1, named(ids)) * fg
        if torch.equal(ids, before):
            return named(ids)


def largest_component_masks(foreground: torch.Tensor) -> torch.Tensor:
    """Bool (N, *spatial): the largest full-connectivity component of each of the N 2D or 3D ``foreground`` maps
    (non-zero = foreground), computed with tensor operations on the maps' device (a GPU needs no copy to the host).

    Every foreground voxel starts with its own number (flat index + 1); each round a voxel sees the largest number
    among its neighbours (a 3^D max-pool), hands it to the voxel its own number names (which lies in the same
    component), takes it itself, then replaces its number twice by the number of the voxel it names (pointer jumping).
    Numbers only grow and stay within their component, so when a round changes nothing each component holds its
    largest number everywhere; on 128^3 noise this took 8 rounds. Ties between equally large components go to the one
    whose first voxel comes first in raster order, as with cc3d's numbering of a C-contiguous array.
    """
    n, spatial = foreground.shape[0], tuple(foreground.shape[1:])
    if len(spatial) not in (2, 3):
        raise ValueError(f"expected 2D or 3D maps (N, *spatial), got shape {tuple(foreground.shape)}")
    voxels = int(np.prod(spatial))
    if n == 0 or voxels == 0:
        return torch.zeros(foreground.shape, dtype=torch.bool, device=foreground.device)
    dtype = torch.float32 if voxels <= FLOAT32_EXACT_VOXELS else torch.float64
    flat = (foreground != 0).reshape(n, voxels)
    kept = []
    for chunk in torch.split(flat, max(1, CHUNK_VOXELS // voxels)):
        roots = _label_components(chunk.to(dtype), spatial)  # background: its own index, adding nothing below
        sizes = torch.zeros(chunk.shape, dtype=torch.int32, device=chunk.device).scatter_add_(1, roots,
                                                                                                chunk.to(torch.int32))
        index = torch.arange(voxels, dtype=torch.int32, device=chunk.device).expand_as(roots)
        first = torch.full(chunk.shape, voxels, dtype=torch.int32, device=chunk.device).scatter_reduce_(
            1, roots, torch.where(chunk, index, voxels), reduce="amin")
        # per component (at its root's slot): size first, then the earliest first voxel
        score = sizes.long() * (voxels + 1) + (voxels - first.long())
        largest = score.argmax(dim=1, keepdim=True)
        kept.append((roots == largest) & chunk)
    return torch.cat(kept).view(n, *spatial)


def _keep_largest_component_on_device(segmentation: torch.Tensor, region_based: bool) -> torch.Tensor:
    if region_based:
        b, c = segmentation.shape[:2]
        kept = largest_component_masks(segmentation.reshape(b * c, *segmentation.shape[2:]))
        return kept.view(segmentation.shape).to(segmentation.dtype)
    labels = segmentation[:, 0]
    values = [v for v in torch.unique(labels).tolist() if v != 0]
    if not values:
        return torch.zeros_like(segmentation)
    kept = largest_component_masks(torch.cat([labels == v for v in values]))  # all classes of all samples at once
    values = torch.tensor(values, device=labels.device).view(len(values), *[1] * labels.ndim)
    kept = kept.view(len(values), *labels.shape) * values
    return kept.sum(0).unsqueeze(1).to(segmentation.dtype)  # classes do not overlap


def keep_largest_component(segmentation: torch.Tensor, region_based: bool = False,
                           on_device: Optional[bool] = None, classes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Remove all but the largest connected component of each class (label maps) or each region channel.

    Per sample, 2D (B, C, H, W) or 3D (B, C, D, H, W); removed voxels become background (0 / False); a class
    that is absent stays absent. Returns a tensor on the input's device and dtype. ``on_device``: filter with tensor
    operations where the tensor is (:func:`largest_component_masks`) instead of with cc3d on the CPU; by default on
    CUDA tensors only (on the CPU cc3d is faster; both give the same result). ``classes``: filter only these label
    values (region channel indices); the others stay as they are (None: all).
    """
    if classes is not None:
        classes = sorted(set(int(c) for c in classes))
        if not classes:
            return segmentation
        filtered = keep_largest_component(segmentation, region_based, on_device)
        if region_based:
            out = segmentation.clone()
            out[:, classes] = filtered[:, classes]
            return out
        chosen = torch.isin(segmentation, torch.tensor(classes, device=segmentation.device, dtype=segmentation.dtype))
        return torch.where(chosen, filtered, segmentation)  # classes do not overlap: a filtered class only loses voxels
    if on_device is None:
        on_device = segmentation.is_cuda
    if on_device:
        return _keep_largest_component_on_device(segmentation, region_based)
    # cc3d numbers components in memory order: a C-contiguous array makes ties go as on the device
    array = np.ascontiguousarray(segmentation.detach().cpu().numpy())
    if region_based:
        array = array.astype(np.uint8)
    out = np.empty_like(array)
    for b in range(array.shape[0]):
        if region_based:
            for c in range(array.shape[1]):
                out[b, c] = _largest_component_per_label(array[b, c])
        else:
            out[b, 0] = _largest_component_per_label(array[b, 0])
    return torch.from_numpy(out).to(device=segmentation.device, dtype=segmentation.dtype)


def single_component_share(segmentations: Iterable[np.ndarray], class_masks: Dict[int, Sequence[int]],
                           per_slice: bool = False) -> Dict[int, Optional[float]]:
    """Per class, the share of its occurrences in reference segmentations that form one connected component.

    ``segmentations``: label maps (2D or 3D, background and -1 outside the image count as neither); ``class_masks``:
    class (label value or region index) -> the label values it covers. An occurrence is a case holding the class or,
    with ``per_slice`` (what a 2D configuration's patches see), a first-axis slice holding it. None for a class that
    never occurs.
    """
    counts = {c: [0, 0] for c in class_masks}  # [occurrences, single-component occurrences]
    for segmentation in segmentations:
        planes = list(segmentation) if per_slice else [segmentation]
        for plane in planes:
            connectivity = 26 if plane.ndim == 3 else 8
            for c, values in class_masks.items():
                mask = np.isin(plane, values)
                if mask.any():
                    counts[c][0] += 1
                    counts[c][1] += int(cc3d.connected_components(mask.astype(np.uint8), connectivity=connectivity,
                                                                  return_N=True)[1] == 1)
    return {c: (single / total if total else None) for c, (total, single) in counts.items()}
