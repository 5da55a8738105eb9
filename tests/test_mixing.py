import pytest
import torch

from nnunetv2_bcp.bcp import (copy_paste, inward_directions, labeled_origin, labeled_partner, mix_by_origin,
                              render_box_mask)


def box_1x1x6x6():
    # 0 inside rows 1-3, columns 2-4
    return render_box_mask((6, 6), torch.tensor([[1, 2]]), (3, 3))


def test_copy_paste_by_hand():
    outer = torch.full((1, 1, 6, 6), 1.0)
    inner = torch.full((1, 1, 6, 6), 7.0)
    mixed = copy_paste(outer, inner, box_1x1x6x6())
    expected = torch.tensor([[1, 1, 1, 1, 1, 1],
                             [1, 1, 7, 7, 7, 1],
                             [1, 1, 7, 7, 7, 1],
                             [1, 1, 7, 7, 7, 1],
                             [1, 1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(mixed[0, 0], expected)


def test_bidirectional_mixing_matches_the_equations():
    # batch of 2: sample 0 is X^in = x^l_0 * M + x^u_0 * (1 - M), sample 1 is X^out = x^u_1 * M + x^l_1 * (1 - M)
    M = box_1x1x6x6().expand(2, 1, 6, 6)
    x_l = torch.stack([torch.full((2, 6, 6), 1.0), torch.full((2, 6, 6), 2.0)])  # two channels
    x_u = torch.stack([torch.full((2, 6, 6), -1.0), torch.full((2, 6, 6), -2.0)])
    inward = torch.tensor([True, False])
    from_l = labeled_origin(M, inward)
    mixed = mix_by_origin(x_l, x_u, from_l)
    assert torch.equal(mixed[0], x_l[0] * M[0] + x_u[0] * (1 - M[0]))
    assert torch.equal(mixed[1], x_u[1] * M[1] + x_l[1] * (1 - M[1]))
    assert mixed[0, 1, 0, 0] == 1 and mixed[0, 1, 2, 3] == -1  # outside box labeled, inside unlabeled
    assert mixed[1, 0, 0, 0] == -2 and mixed[1, 0, 2, 3] == 2
    # targets: label maps keep their integer dtype
    y_l = torch.tensor([1, 2], dtype=torch.int16).view(2, 1, 1, 1).expand(2, 1, 6, 6)
    y_u = torch.tensor([3, 4], dtype=torch.int16).view(2, 1, 1, 1).expand(2, 1, 6, 6)
    y = mix_by_origin(y_l, y_u, from_l)
    assert y.dtype == torch.int16
    assert y[0, 0, 0, 0] == 1 and y[0, 0, 2, 3] == 3 and y[1, 0, 0, 0] == 4 and y[1, 0, 2, 3] == 2
    # region targets (B, R, ...) as bool
    r_l = torch.ones(2, 3, 6, 6, dtype=torch.bool)
    r_u = torch.zeros(2, 3, 6, 6, dtype=torch.bool)
    r = mix_by_origin(r_l, r_u, from_l)
    assert torch.equal(r, from_l.expand(2, 3, 6, 6))


def test_3d_mixing():
    M = render_box_mask((4, 4, 4), torch.tensor([[0, 0, 0]]), (2, 2, 2)).expand(1, 1, 4, 4, 4)
    x_l, x_u = torch.ones(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)
    out = mix_by_origin(x_l, x_u, labeled_origin(M, torch.tensor([False])))  # X^out
    assert out.sum() == 8 and out[0, 0, :2, :2, :2].all()


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_every_batch_position_serves_both_directions_equally(batch_size):
    g = torch.Generator().manual_seed(0)
    steps = 2000
    draws = torch.stack([inward_directions(batch_size, generator=g) for _ in range(steps)])
    # half X^in per step (odd batch sizes: the spare sample goes either way)
    assert set(draws.sum(1).tolist()) <= {batch_size // 2, (batch_size + 1) // 2}
    # nnU-Net forces foreground into the last samples of a batch: every position must go both ways about equally
    share_in = draws.float().mean(0)
    assert torch.allclose(share_in, torch.full((batch_size,), 0.5), atol=0.05), share_in
    if batch_size % 2:  # the spare sample goes to X^in in about half of the steps
        assert abs((draws.sum(1) > batch_size // 2).float().mean() - 0.5) < 0.05
    with pytest.raises(ValueError):
        inward_directions(0)


def test_stage1_partner_is_the_next_sample():
    x = torch.arange(3.0).view(3, 1, 1, 1)
    assert labeled_partner(x).flatten().tolist() == [1.0, 2.0, 0.0]
    assert labeled_partner(x[:1]).flatten().tolist() == [0.0]


@pytest.mark.parametrize("rank_batch_sizes", [(1, 1), (2, 1), (3, 3, 2)])
def test_ranks_draw_their_shares_of_balanced_global_directions(rank_batch_sizes):
    """DDP: every rank draws with a generator seeded alike; together the ranks' samples split the global batch in
    halves at every step (one sample per rank drawn independently would do so only half of the time)."""
    total = sum(rank_batch_sizes)
    offsets = [sum(rank_batch_sizes[:r]) for r in range(len(rank_batch_sizes))]
    for step in range(50):
        draws = [inward_directions(b, torch.Generator().manual_seed(step), rank_offset=o, global_batch_size=total)
                 for b, o in zip(rank_batch_sizes, offsets)]
        assert [len(d) for d in draws] == list(rank_batch_sizes)
        assert int(torch.cat(draws).sum()) in {total // 2, (total + 1) // 2}
    with pytest.raises(ValueError, match="fit in the global batch"):
        inward_directions(2, rank_offset=1, global_batch_size=2)
