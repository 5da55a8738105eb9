"""Per-rank BCP logic under torch.distributed (gloo, two CPU processes): students synchronised by DDP, each rank
with its own unlabeled data, and teachers that stay identical through the EMA."""
import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnunetv2_bcp.bcp import ema_update_


def _rank_main(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial weights on every rank, as nnU-Net's DDP start
        student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.LeakyReLU(),
                                nn.Conv2d(4, 3, 1))
        teacher = copy.deepcopy(student)
        ddp = DistributedDataParallel(student)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        data_rng = torch.Generator().manual_seed(1000 + rank)  # each rank its own (unlabeled) data
        for _ in range(3):
            x = torch.randn(2, 1, 8, 8, generator=data_rng)
            with torch.no_grad():
                pseudo = teacher(x).argmax(1)
            loss = nn.functional.cross_entropy(ddp(x), pseudo)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema_update_(teacher, ddp, 0.9)
        torch.save({"teacher": teacher.state_dict(), "data": x}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_teachers_stay_identical_across_ranks(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["data"], r1["data"])  # the ranks saw different data
    for key, value in r0["teacher"].items():
        assert torch.equal(value, r1["teacher"][key]), key
    start = copy.deepcopy(r0["teacher"])
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.LeakyReLU(),
                          nn.Conv2d(4, 3, 1))
    assert not torch.equal(fresh[0].weight, start["0.weight"])  # and the teacher did move
