"""Box masks ``M`` of BCP: 0 inside one random box, 1 elsewhere, as in the paper."""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

IntOrSeq = Union[int, Sequence[int]]


def _per_axis(value: IntOrSeq, ndim: int, name: str) -> Tuple[int, ...]:
    values = (int(value),) * ndim if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(values) != ndim:
        raise ValueError(f"{name} has {len(values)} entries but the patch has {ndim} spatial axes")
    return values


def box_size(patch_shape: Sequence[int], ratio: float = 2 / 3, stride: IntOrSeq = 1) -> Tuple[int, ...]:
    """Box side per axis: ``ratio * patch side``, rounded to a multiple of ``stride`` (at least one stride)."""
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must lie in (0, 1), got {ratio}")
    strides = _per_axis(stride, len(patch_shape), "stride")
    sizes = []
    for side, s in zip(patch_shape, strides):
        if s < 1 or side % s:
            raise ValueError(f"patch side {side} is not a multiple of the box stride {s}; patch shape "
                             f"{tuple(patch_shape)}, strides {strides}")
        sizes.append(min(side, max(s, int(round(ratio * side / s)) * s)))
    return tuple(sizes)


def sample_box_starts(patch_shape: Sequence[int], size: Sequence[int], num_boxes: int = 1, stride: IntOrSeq = 1,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniformly random box corners on the ``stride`` grid: int64 tensor (num_boxes, D)."""
    strides = _per_axis(stride, len(patch_shape), "stride")
    columns = [torch.randint(0, (side - sz) // s + 1, (num_boxes,), generator=generator) * s
               for side, sz, s in zip(patch_shape, size, strides)]
    return torch.stack(columns, dim=1)


def render_box_mask(patch_shape: Sequence[int], starts: torch.Tensor, size: Sequence[int],
                    device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Float mask (N, 1, *patch_shape) with 0 inside box ``[start, start + size)`` of each row of ``starts``."""
    mask = torch.ones((starts.shape[0], 1, *patch_shape), device=device)
    for n, start in enumerate(starts.tolist()):
        mask[(n, 0) + tuple(slice(b, b + s) for b, s in zip(start, size))] = 0
    return mask


def random_box_mask(patch_shape: Sequence[int], batch_size: int, ratio: float = 2 / 3, stride: IntOrSeq = 1,
                    generator: Optional[torch.Generator] = None,
                    device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """BCP's mask ``M`` as a float tensor (batch_size, 1, *patch_shape): 0 inside the box, 1 outside.

    The box side is ``ratio`` times the patch side along every axis; its position is uniform. With ``stride``
    (the coarsest deep-supervision downsampling factor per axis) the box edges sit on multiples of the stride,
    so :func:`downsample_mask` is exact at every deep-supervision scale. As in the reference code, one box is
    drawn for the whole batch.
    """
    size = box_size(patch_shape, ratio, stride)
    mask = render_box_mask(patch_shape, sample_box_starts(patch_shape, size, 1, stride, generator), size, device)
    return mask.expand(batch_size, *mask.shape[1:])


def downsample_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resize a mask to a deep-supervision scale with nnU-Net's target interpolation (nearest-exact)."""
    if tuple(mask.shape[2:]) == tuple(shape):
        return mask
    return F.interpolate(mask.float(), size=tuple(shape), mode="nearest-exact").to(mask.dtype)
