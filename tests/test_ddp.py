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


# ---------------------------------------------------------------- the trainer itself under torch.distributed

def _gloo_trainer_class():
    from nnunetv2_bcp import nnUNetTrainerBCP

    class GlooCPUBCP(nnUNetTrainerBCP):
        """nnUNetTrainerBCP on CPU ranks: nnU-Net assumes CUDA whenever torch.distributed is initialised, so the
        device and grad scaler are put back to CPU (test only); 1 epoch of stage 1, 2 of stage 2."""

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.device, self.grad_scaler = torch.device("cpu"), None
            self.num_epochs, self.bcp_pretrain_epochs, self.bcp_max_pretrain_epochs = 3, 1, 1
            self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 1
            self.unlabeled_seen = []

        def stage_two_step(self, batch, unlabeled_batch):
            self.unlabeled_seen.append(unlabeled_batch["data"].clone())
            return super().stage_two_step(batch, unlabeled_batch)

    return GlooCPUBCP


def _trainer_rank_main(rank, world_size, init_file, out_dir, preprocessed):
    os.environ["nnUNet_n_proc_DA"] = "0"
    torch.set_num_threads(1)  # two ranks on the CI machine's two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
        from batchgenerators.utilities.file_and_folder_operations import join, load_json

        # nnU-Net wraps with device_ids=[rank], which only CUDA modules accept
        nnunet_trainer_module.DDP = lambda module, device_ids=None: DistributedDataParallel(module)
        plans = dict(load_json(join(preprocessed, "nnUNetPlans.json")), continue_training=False)
        trainer = _gloo_trainer_class()(plans, "3d_fullres", 0, load_json(join(preprocessed, "dataset.json")))
        real_save, saved = torch.save, []

        def recording_save(obj, f, *args, **kwargs):
            saved.append(str(f))
            return real_save(obj, f, *args, **kwargs)

        torch.save = recording_save
        try:
            trainer.run_training()
        finally:
            torch.save = real_save
        torch.save({"teacher": trainer.teacher.state_dict(),
                    "student": trainer.network.module.state_dict(),
                    "unlabeled": trainer.unlabeled_seen, "saved": saved, "batch_size": trainer.batch_size,
                    "iteration": trainer.bcp_iteration, "output_folder": trainer.output_folder},
                   os.path.join(out_dir, f"trainer_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_bcp_trainer_on_two_gloo_ranks(synthetic_3d, tmp_path):
    """The real trainer on two ranks: per-rank batch, distinct unlabeled streams, identical students and teachers,
    only rank 0 writes checkpoints and the BCP progress file."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    mp.spawn(_trainer_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), synthetic_3d["preprocessed"]),
             nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"trainer_rank{r}.pt", weights_only=False) for r in (0, 1))
    global_batch = load_json(join(synthetic_3d["preprocessed"], "nnUNetPlans.json"))[
        "configurations"]["3d_fullres"]["batch_size"]
    assert r0["batch_size"] + r1["batch_size"] == global_batch
    assert r0["iteration"] == r1["iteration"] == 4  # 2 stage-2 epochs of 2 iterations
    assert all(u.shape[0] == r["batch_size"] for r in (r0, r1) for u in r["unlabeled"])
    for u0, u1 in zip(r0["unlabeled"], r1["unlabeled"]):
        assert not torch.equal(u0, u1)  # each rank draws its own unlabeled patches
    for key, value in r0["student"].items():
        assert torch.equal(value, r1["student"][key]), key
    for key, value in r0["teacher"].items():
        assert torch.equal(value, r1["teacher"][key]), key
    assert not torch.equal(r0["teacher"][_FIRST_CONV], r0["student"][_FIRST_CONV])  # an EMA, not a copy
    assert r1["saved"] == [] and any("checkpoint_final.pth" in p for p in r0["saved"])
    final = torch.load(join(r0["output_folder"], "checkpoint_final.pth"), weights_only=False, map_location="cpu")
    assert torch.equal(final["bcp"]["teacher_weights"][_FIRST_CONV], r0["teacher"][_FIRST_CONV])
    assert [p["epoch"] for p in load_json(join(r0["output_folder"], "bcp_progress.json"))] == [1, 2]


_FIRST_CONV = "encoder.stages.0.0.convs.0.conv.weight"
