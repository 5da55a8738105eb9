"""Copy-paste mixing of BCP (BCP.md, stages 1 and 2).

Pairing inside a batch of B labeled and B unlabeled patches: mixed sample ``k`` is built from labeled
patch ``k`` and unlabeled patch ``k``, so the student sees B mixed patches, as many as nnU-Net loads.
The first ``n_in`` samples are ``X^in`` (labeled image outside the box, unlabeled box pasted in), the rest
are ``X^out`` (unlabeled image outside, labeled box pasted in); see :func:`inward_directions`.
"""
import torch


def inward_directions(batch_size: int, step: int = 0, device=None) -> torch.Tensor:
    """Bool (B,): True for ``X^in`` samples, False for ``X^out``.

    Half of the batch goes each way. For an odd batch size the spare sample alternates with ``step``
    (the iteration counter), so over two iterations both directions get the same number of samples;
    batch size 1 alternates between ``X^in`` and ``X^out``.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    num_in = (batch_size + 1 - step % 2) // 2
    return torch.arange(batch_size, device=device) < num_in


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


def origin_weights(from_labeled: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-voxel loss weight: 1 for voxels from a labeled image, ``alpha`` for voxels from an unlabeled one."""
    return torch.where(from_labeled, 1.0, float(alpha)).to(torch.float32)


def copy_paste(outer: torch.Tensor, inner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``outer ⊙ M + inner ⊙ (1 - M)``: ``inner``'s box pasted into ``outer`` (any dtype, any channels)."""
    return mix_by_origin(outer, inner, mask.bool())


def labeled_partner(batch: torch.Tensor) -> torch.Tensor:
    """Stage-1 pairing: sample ``k`` is mixed with sample ``k + 1`` (cyclically) of the same labeled batch.

    Every labeled patch is used once outside and once inside a box; with batch size 1 the partner is the
    patch itself, so stage 1 degenerates to plain supervised training.
    """
    return torch.roll(batch, shifts=-1, dims=0)
