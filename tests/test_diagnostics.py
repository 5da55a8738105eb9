"""Stage-2 diagnostics: per-step figures on the device, epoch means, bcp_progress.json and bcp_progress.png."""
import json

import numpy as np
import torch
from matplotlib.image import imread

from nnunetv2_bcp.training.diagnostics import (PROGRESS_JSON, PROGRESS_PNG, classes_below_share, epoch_figures,
                                               progress_figure, record_progress, skipped_step_figures, step_figures)


def _figures(num_classes, value):
    return {"bcp_loss_labeled": torch.tensor(value), "bcp_loss_unlabeled": torch.tensor(2 * value),
            "bcp_agreement": torch.tensor(0.5), "bcp_pseudo_fg_fraction": torch.full((num_classes,), value),
            "bcp_labeled_fg_fraction": torch.full((num_classes,), 0.1)}


class _Labels:
    """nnU-Net's label manager as step_figures reads it: labels 0, 1, 2."""
    has_regions = False
    foreground_labels = [1, 2]


def test_step_figures_agreement_counts_the_unlabeled_origin_voxels_only():
    """Student and mixed target agree on 3 of the 4 unlabeled-origin voxels and disagree on every labeled-origin one:
    the agreement is 0.75, whatever the labeled-origin voxels hold."""
    target = torch.tensor([[[0, 1, 2, 2, 1, 1]]])  # (B, 1, X): label map
    from_labeled = torch.tensor([[[True, True, False, False, False, False]]])
    student = torch.tensor([[2, 0, 2, 2, 1, 0]])  # labeled-origin voxels all wrong; the last unlabeled one wrong
    logits = torch.nn.functional.one_hot(student, 3).movedim(-1, 1).float()  # (B, 3, X)
    pseudo = torch.tensor([[[1, 1, 0, 2]]])
    labeled = torch.tensor([[[2, 0, 0, 0]]])
    figures = step_figures(logits, target, from_labeled, pseudo, labeled, torch.tensor([0.3, 0.7]), _Labels())
    assert figures["bcp_agreement"].item() == 0.75
    assert torch.equal(figures["bcp_pseudo_fg_fraction"], torch.tensor([0.5, 0.25]))
    assert torch.equal(figures["bcp_labeled_fg_fraction"], torch.tensor([0.0, 0.25]))
    assert torch.allclose(torch.stack([figures["bcp_loss_labeled"], figures["bcp_loss_unlabeled"]]),
                          torch.tensor([0.3, 0.7]))


def test_epoch_means_leave_skipped_steps_out():
    steps = [_figures(3, 0.2), skipped_step_figures(3, torch.device("cpu")), _figures(3, 0.4)]
    means = epoch_figures(steps)
    assert np.isclose(means["bcp_loss_labeled"], 0.3) and np.isclose(means["bcp_loss_unlabeled"], 0.6)
    assert np.allclose(means["bcp_pseudo_fg_fraction"], [0.3] * 3)


def test_classes_below_a_quarter_of_their_labeled_share():
    assert classes_below_share([1, 2, 3], [0.3, 0.05, 0.0], [0.33, 0.33, 0.0]) == [(2, 0.05, 0.33)]


def test_progress_file_and_picture_with_many_classes(tmp_path):
    names = [str(c) for c in range(1, 16)]  # 15 classes still render, with a legend
    for epoch in (3, 4, 5, 4):  # a resumed epoch replaces its entry
        figures = epoch_figures([_figures(15, 0.01 * epoch)])
        record_progress(str(tmp_path), epoch, figures, names)
    history = json.load(open(tmp_path / PROGRESS_JSON))
    assert [h["epoch"] for h in history] == [3, 4]
    picture = imread(str(tmp_path / PROGRESS_PNG))
    assert picture.shape[0] > 500 and picture.shape[1] > 500 and picture.std() > 0
    assert not list(tmp_path.glob("*.tmp*"))


def test_progress_figure_draws_each_origin_class_and_the_stage_start_where_it_says():
    history = [{"epoch": e, "bcp_loss_labeled": 0.1 * e, "bcp_loss_unlabeled": 0.2 * e, "bcp_agreement": 0.9 - 0.01 * e,
                "bcp_pseudo_fg_fraction": [0.01 * e, 0.02 * e], "bcp_labeled_fg_fraction": [0.03, 0.04]}
               for e in (7, 8, 9)]
    figure = progress_figure(history, ["RV", "LV"])
    loss, share, agreement = figure.axes

    def drawn(ax):
        return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert drawn(loss)["labeled-origin voxels"] == ([7, 8, 9], [0.1 * e for e in (7, 8, 9)])
    assert drawn(loss)["unlabeled-origin voxels"][1] == [0.2 * e for e in (7, 8, 9)]
    assert np.allclose(drawn(share)["LV: teacher's pseudo-labels"][1], [0.02 * e for e in (7, 8, 9)])
    assert np.allclose(drawn(share)["RV: labeled patches"][1], [0.03] * 3)
    assert np.allclose(drawn(agreement)["student = teacher"][1], [0.83, 0.82, 0.81])
    assert all(list(drawn(ax)["stage 2 starts"][0]) == [7, 7] for ax in figure.axes)
