"""Pseudo-labels from teacher logits, with optional largest-connected-component filtering (BCP.md, step 2)."""
import cc3d
import numpy as np
import torch


def pseudo_labels(logits: torch.Tensor, region_based: bool = False) -> torch.Tensor:
    """Hard pseudo-labels from logits (B, K, ...).

    Label maps (softmax training): argmax over classes, returned as (B, 1, ...) int16 like nnU-Net's targets
    (for two classes this is the foreground probability thresholded at 0.5). Regions (sigmoid training):
    ``sigmoid > 0.5`` per channel, i.e. ``logit > 0``, returned as bool (B, R, ...) like nnU-Net's region targets.
    """
    if region_based:
        return logits > 0
    return logits.argmax(dim=1, keepdim=True).to(torch.int16)


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


def keep_largest_component(segmentation: torch.Tensor, region_based: bool = False) -> torch.Tensor:
    """Remove all but the largest connected component of each class (label maps) or each region channel.

    Per sample, 2D (B, C, H, W) or 3D (B, C, D, H, W); removed voxels become background (0 / False); a class
    that is absent stays absent. Runs on the CPU (cc3d) and returns a tensor on the input's device and dtype.
    """
    array = segmentation.detach().cpu().numpy()
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
