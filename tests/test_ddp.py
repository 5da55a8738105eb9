"""nnUNetTrainerBCP under torch.distributed (gloo, two CPU processes): students synchronised by DDP, each rank with
its own unlabeled data, teachers that stay identical through the EMA, and one decision on non-finite steps."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel


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
            self.unlabeled_seen, self.directions_drawn = [], []

        def stage_two_step(self, batch, unlabeled_batch):
            self.unlabeled_seen.append(unlabeled_batch["data"].clone())
            return super().stage_two_step(batch, unlabeled_batch)

        def draw_directions(self, batch_size):
            self.directions_drawn.append(super().draw_directions(batch_size))
            return self.directions_drawn[-1]

    return GlooCPUBCP


def _gloo_trainer(preprocessed):
    """A GlooCPUBCP trainer on this rank's process group (CPU DDP)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from batchgenerators.utilities.file_and_folder_operations import join, load_json

    # nnU-Net wraps with device_ids=[rank], which only CUDA modules accept
    nnunet_trainer_module.DDP = lambda module, device_ids=None: DistributedDataParallel(module)
    plans = dict(load_json(join(preprocessed, "nnUNetPlans.json")), continue_training=False)
    return _gloo_trainer_class()(plans, "3d_fullres", 0, load_json(join(preprocessed, "dataset.json")))


def _rank_main(rank, world_size, init_file, out_dir, preprocessed):
    """Both tests' work on one pair of ranks: each rank is a spawned process that imports nnU-Net."""
    os.environ["nnUNet_n_proc_DA"] = "0"
    torch.set_num_threads(1)  # two ranks on the CI machine's two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _trainer_run_on_rank(rank, out_dir, preprocessed)
        _nonfinite_step_on_rank(rank, out_dir, preprocessed)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_gloo_ranks(synthetic_3d, tmp_path_factory):
    """The output folder of ``_rank_main`` on two ranks (a hang fails the tests that use it). Made once per test run:
    pytest-xdist's workers share the parent of their temporary folders, and the first to get here makes it."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "two_gloo_ranks"
    with FileLock(str(shared / "two_gloo_ranks.lock")):
        if not (out / "done").is_file():
            out.mkdir(exist_ok=True)
            # a fresh rendezvous file per attempt: one left by a failed attempt can hang the next
            _spawn(_rank_main, (2, str(out / f"init_{os.getpid()}"), str(out), synthetic_3d["preprocessed"]))
            (out / "done").write_text("")
    return out


def _spawn(function, args, timeout=600):
    """Two ranks; a hang fails the test after ``timeout`` seconds instead of blocking the suite."""
    context = mp.spawn(function, args=args, nprocs=2, join=False)
    deadline = time.time() + timeout
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after {timeout} s: hang")


def _trainer_run_on_rank(rank, out_dir, preprocessed):
    trainer = _gloo_trainer(preprocessed)
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
                "unlabeled": trainer.unlabeled_seen, "directions": trainer.directions_drawn,
                "saved": saved, "batch_size": trainer.batch_size,
                "iteration": trainer.bcp_iteration, "output_folder": trainer.output_folder},
               os.path.join(out_dir, f"trainer_rank{rank}.pt"))


@pytest.mark.heavy(5)
def test_bcp_trainer_on_two_gloo_ranks(synthetic_3d, two_gloo_ranks):
    """The real trainer on two ranks: per-rank batch, distinct unlabeled streams, identical students and teachers,
    only rank 0 writes checkpoints and the BCP progress file."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    tmp_path = two_gloo_ranks
    r0, r1 = (torch.load(tmp_path / f"trainer_rank{r}.pt", weights_only=False) for r in (0, 1))
    global_batch = load_json(join(synthetic_3d["preprocessed"], "nnUNetPlans.json"))[
        "configurations"]["3d_fullres"]["batch_size"]
    assert r0["batch_size"] + r1["batch_size"] == global_batch
    assert r0["iteration"] == r1["iteration"] == 4  # 2 stage-2 epochs of 2 iterations
    assert all(u.shape[0] == r["batch_size"] for r in (r0, r1) for u in r["unlabeled"])
    for u0, u1 in zip(r0["unlabeled"], r1["unlabeled"]):
        assert not torch.equal(u0, u1)  # each rank draws its own unlabeled patches
    # every step's global batch is split in halves between X^in and X^out (one sample per rank here)
    assert len(r0["directions"]) == len(r1["directions"]) == 4
    for d0, d1 in zip(r0["directions"], r1["directions"]):
        assert int(d0.sum() + d1.sum()) in {global_batch // 2, (global_batch + 1) // 2}
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


def _nonfinite_step_on_rank(rank, out_dir, preprocessed):
    trainer = _gloo_trainer(preprocessed)
    trainer.initialize()
    trainer.teacher.load_state_dict(trainer.network.module.state_dict())
    trainer.bcp_teacher_initialized = True
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    g = torch.Generator().manual_seed(rank)
    batch_size = trainer.batch_size
    labeled = {"data": torch.randn(batch_size, 1, *patch, generator=g), "keys": [f"l{rank}"] * batch_size,
               "target": [torch.randint(0, 3, (batch_size, 1, *[round(p * s) for p, s in zip(patch, sc)]),
                                        generator=g, dtype=torch.int16) for sc in scales]}
    unlabeled = {"data": torch.randn(batch_size, 1, *patch, generator=g), "keys": [f"u{rank}"] * batch_size}
    if rank == 1:
        labeled["data"][:] = float("nan")  # only this rank sees a non-finite loss
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in trainer.network.module.state_dict().items()}
    first = trainer.stage_two_step(labeled, unlabeled)
    trainer.bcp_max_nonfinite_steps = 2
    try:
        trainer.stage_two_step(labeled, unlabeled)
        stopped = None
    except FloatingPointError as e:
        stopped = str(e)
    torch.save({"loss": float(first["loss"]), "stopped": stopped,
                "teacher_kept": all(torch.equal(v, teacher[k]) for k, v in trainer.teacher.state_dict().items()),
                "student_kept": all(torch.equal(v, student[k])
                                    for k, v in trainer.network.module.state_dict().items()),
                "teacher": trainer.teacher.state_dict()}, os.path.join(out_dir, f"nonfinite_rank{rank}.pt"))


def test_a_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(two_gloo_ranks):
    """A NaN on rank 1 only: no hang, both ranks skip the step (no optimizer step, no EMA), teachers stay identical,
    and the stop after bcp_max_nonfinite_steps happens on both ranks."""
    tmp_path = two_gloo_ranks
    r0, r1 = (torch.load(tmp_path / f"nonfinite_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["loss"] != r0["loss"] and r1["loss"] != r1["loss"]  # both report the skipped step (NaN)
    assert r0["teacher_kept"] and r1["teacher_kept"] and r0["student_kept"] and r1["student_kept"]
    for key, value in r0["teacher"].items():
        assert torch.equal(value, r1["teacher"][key]), key
    assert r0["stopped"] and r1["stopped"] and "2 non-finite steps in a row" in r0["stopped"]
    assert "non-finite gradients from another rank" in r0["stopped"] and "['l1', 'l1']" not in r0["stopped"]
    assert "on this rank;" in r1["stopped"] and "['l1'" in r1["stopped"]
