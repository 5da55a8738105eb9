"""Copy-paste mixing of BCP (Bai et al., CVPR 2023), for both stages.

Pairing inside a batch of B labeled and B unlabeled patches: mixed sample ``k`` is built from labeled
patch ``k`` and unlabeled patch ``k``, so the student sees B mixed patches, as many as nnU-Net loads.
Half of the samples, drawn at random every step, are ``X^in`` (labeled image outside the box, unlabeled box
pasted in), the others ``X^out`` (unlabeled image outside, labeled box pasted in); see :func:`inward_directions`.
"""
from typing import Optional

import torch


def inward_directions(batch_size: int, generator: Optional[torch.Generator] = None, device=None,
                      rank_offset: int = 0, global_batch_size: Optional[int] = None) -> torch.Tensor:
    """Bool (B,): True for ``X^in`` samples, False for ``X^out``, drawn at random.

    Half of the batch goes each way; for an odd batch size a fair coin gives the spare sample to one direction
    (batch size 1: ``X^in`` or ``X^out``). Which samples go in is a random permutation: nnU-Net's loader puts
    its foreground-forced patches at the end of every batch, and a fixed order would always put them in the same
    direction (e.g. with batch size 2 the forced patch would always be ``X^out``, keeping only its box).

    Under DDP the halves are those of the global batch: every rank draws the same permutation of
    ``global_batch_size`` samples (a ``generator`` seeded alike on every rank) and takes its ``batch_size`` samples
    from ``rank_offset`` on; drawn per rank, one sample per rank would send half of the global batches one way.
    """
    total = batch_size if global_batch_size is None else global_batch_size
    if batch_size < 1 or not 0 <= rank_offset <= total - batch_size:
        raise ValueError(f"batch size must be >= 1 and fit in the global batch of {total} from offset {rank_offset}, "
                         f"got {batch_size}")
    num_in = total // 2 + int(total % 2 and torch.randint(0, 2, (1,), generator=generator).item())
    order = torch.randperm(total, generator=generator)
    return (order[rank_offset:rank_offset + batch_size] < num_in).to(device)


def labeled_origin(mask: torch.Tensor, inward: torch.Tensor) -> torch.Tensor:
    """Bool map (B, 1, ...) of voxels taken from the labeled image.

    ``X^in = x^l ⊙ M + x^u ⊙ (1-M)``: labeled where ``M = 1``; ``X^out = x^u ⊙ M + x^l ⊙ (1-M)``: labeled where
    ``M = 0``.
    """
    outside_box = mask.bool()
    inward = inward.view(-1, *([1] * (mask.ndim - 1)))
    return torch.where(inward, outside_box, ~outside_box)


def mix_by_origin(labeled: torch.Tensor, unlabeled: torch.Tensor, from_labeled: torch.Tensor) -> torch.Tensor:
    """Voxel-wise choice: ``labeled`` where ``from_labeled`` is True, else ``unlabeled``.

    Works for images (B, C, ...), label maps (B, 1, ...) and region targets (B, R, ...) alike (the map
    broadcasts over channels) and keeps the dtype of ``labeled``.
    """
    return torch.where(from_labeled, labeled, unlabeled.to(labeled.dtype))


def copy_paste(outer: torch.Tensor, inner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``outer ⊙ M + inner ⊙ (1 - M)``: ``inner``'s box pasted into ``outer`` (any dtype, any channels)."""
    return mix_by_origin(outer, inner, mask.bool())


def labeled_partner(batch: torch.Tensor) -> torch.Tensor:
    """Stage-1 pairing: sample ``k`` is mixed with sample ``k + 1`` (cyclically) of the same labeled batch.

    Every labeled patch is used once outside and once inside a box; with batch size 1 the partner is the
    patch itself, so stage 1 degenerates to plain supervised training.
    """
    return torch.roll(batch, shifts=-1, dims=0)
