"""Per-epoch diagnostics of BCP's stage 2: the loss on each origin, the teacher's pseudo-label share per class against
the labeled patches' share, and student-teacher agreement; logged, written to ``fold_X/bcp_progress.json`` and
plotted to ``fold_X/bcp_progress.png`` beside nnU-Net's ``progress.png``.

The per-step figures stay on the device during the epoch (no host synchronisation per step) and are read once at its
end.
"""
import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, save_json

from nnunetv2_bcp.bcp import pseudo_labels

FIGURES = ('bcp_loss_labeled', 'bcp_loss_unlabeled', 'bcp_pseudo_fg_fraction', 'bcp_agreement',
           'bcp_labeled_fg_fraction')
# warn when the teacher's pseudo-labels hold a class on less than this share of its frequency in the labeled patches
LOW_PSEUDO_LABEL_SHARE = 0.25
PROGRESS_JSON, PROGRESS_PNG = "bcp_progress.json", "bcp_progress.png"


def foreground_fractions(segmentation: torch.Tensor, label_manager) -> torch.Tensor:
    """Share of the voxels per foreground class (label map) or region (one-hot channels; an extra ignore channel after
    the regions is left out), as a float tensor on the segmentation's device."""
    if label_manager.has_regions:
        num_regions = len(label_manager.foreground_regions)
        return segmentation[:, :num_regions].float().mean(dim=(0, *range(2, segmentation.ndim)))
    return torch.stack([(segmentation == c).float().mean() for c in label_manager.foreground_labels])


@torch.no_grad()
def step_figures(logits: torch.Tensor, mixed_target: torch.Tensor, from_labeled: torch.Tensor,
                 pseudo: torch.Tensor, labeled_target: torch.Tensor, terms: torch.Tensor,
                 label_manager) -> Dict[str, torch.Tensor]:
    """The figures of one stage-2 step, as tensors on the device: both loss terms, foreground share per class in the
    teacher's pseudo-labels and in the labeled targets, student-teacher agreement on the unlabeled-origin voxels."""
    regions = label_manager.has_regions
    student = pseudo_labels(logits.float(), region_based=regions)
    if regions:
        agree = (student == mixed_target[:, :student.shape[1]].bool()).all(1, keepdim=True)
    else:
        agree = student == mixed_target
    unlabeled_voxels = ~from_labeled
    agreement = (agree & unlabeled_voxels).sum() / unlabeled_voxels.sum().clamp_min(1)
    terms = terms.detach().float()
    return {'bcp_loss_labeled': terms[0], 'bcp_loss_unlabeled': terms[1],
            'bcp_pseudo_fg_fraction': foreground_fractions(pseudo, label_manager), 'bcp_agreement': agreement,
            'bcp_labeled_fg_fraction': foreground_fractions(labeled_target, label_manager)}


def skipped_step_figures(num_classes: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """NaN figures for a skipped step (left out of the epoch's means)."""
    nan = torch.tensor(float("nan"), device=device)
    return {'bcp_loss_labeled': nan, 'bcp_loss_unlabeled': nan, 'bcp_agreement': nan,
            'bcp_pseudo_fg_fraction': nan.expand(num_classes), 'bcp_labeled_fg_fraction': nan.expand(num_classes)}


def epoch_figures(steps: List[Dict[str, torch.Tensor]]) -> Dict[str, object]:
    """Means over an epoch's steps (NaN steps left out), read from the device once."""
    stacked = {k: torch.stack([s[k].float() for s in steps]) for k in FIGURES}
    means = {k: torch.nanmean(v, dim=0) for k, v in stacked.items()}
    return {k: v.cpu().numpy().tolist() for k, v in means.items()}


def classes_below_share(classes: Sequence, pseudo_fg_fraction: Sequence[float], labeled_fg_fraction: Sequence[float],
                        share: float = LOW_PSEUDO_LABEL_SHARE) -> list:
    """``(class, pseudo share, labeled share)`` of the classes the teacher labels on less than ``share`` of their
    share in the labeled patches (a class absent from those is not judged)."""
    return [(c, p, q) for c, p, q in zip(classes, pseudo_fg_fraction, labeled_fg_fraction) if p < share * q]


def record_progress(output_folder: str, epoch: int, figures: dict, class_names: Sequence[str]) -> list:
    """Add (or replace) this epoch's figures in ``bcp_progress.json`` and redraw ``bcp_progress.png``."""
    path = join(output_folder, PROGRESS_JSON)
    history = load_json(path) if isfile(path) else []
    history = [h for h in history if h["epoch"] < epoch] + [{"epoch": epoch, **figures}]
    save_json(history, path, sort_keys=False)
    plot_progress(history, class_names, join(output_folder, PROGRESS_PNG))
    return history


def plot_progress(history: List[dict], class_names: Sequence[str], path: str) -> None:
    """Draw :func:`progress_figure` to ``path`` (through a temporary file: a reader never sees half a picture)."""
    fig = progress_figure(history, class_names)  # selects the agg backend before pyplot is imported here
    import matplotlib.pyplot as plt
    temporary = path + ".tmp.png"
    fig.savefig(temporary)
    plt.close(fig)
    os.replace(temporary, path)


def progress_figure(history: List[dict], class_names: Sequence[str]):
    """Three panels over the epochs: loss per origin, pseudo-label vs labeled foreground share per class, agreement;
    a vertical line where stage 2 starts (its first recorded epoch)."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(3, 1, figsize=(12, 13), sharex=True)
    axes[0].plot(epochs, [h["bcp_loss_labeled"] for h in history], color="b", label="labeled-origin voxels")
    axes[0].plot(epochs, [h["bcp_loss_unlabeled"] for h in history], color="r", label="unlabeled-origin voxels")
    axes[0].set_ylabel("BCP loss")
    colours = plt.get_cmap("tab20")
    pseudo, labeled = np.array([h["bcp_pseudo_fg_fraction"] for h in history]), \
        np.array([h["bcp_labeled_fg_fraction"] for h in history])
    for i, name in enumerate(class_names):
        axes[1].plot(epochs, pseudo[:, i], color=colours(i % 20), label=f"{name}: teacher's pseudo-labels")
        axes[1].plot(epochs, labeled[:, i], color=colours(i % 20), ls="--", label=f"{name}: labeled patches")
    axes[1].set_ylabel("foreground share of the voxels")
    axes[2].plot(epochs, [h["bcp_agreement"] for h in history], color="g", label="student = teacher")
    axes[2].set_ylabel("agreement on unlabeled-origin voxels")
    axes[2].set_xlabel("epoch")
    for ax in axes:
        ax.axvline(epochs[0], color="k", ls=":", label="stage 2 starts")
        ax.legend(loc="best", fontsize="small", ncol=max(1, len(class_names) // 8 + 1) if ax is axes[1] else 1)
    fig.tight_layout()
    return fig
