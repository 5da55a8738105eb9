"""The CUDA code path of nnUNetTrainerBCP: autocast and the grad scaler, a torch.compile'd student with the EMA teacher,
pinned-memory streams, the largest-component filter on the GPU, nnUNetv2_train/predict with -device cuda. Skipped
(with the reason) where CUDA is not available.

Where CUDA is (e.g. examples/device_check.sh runs this):
    cd tests && python -m pytest -rs -v test_cuda.py
"""
import os

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from conftest import run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA tests: torch.cuda.is_available() is False on this machine")

FIRST_CONV = "encoder.stages.0.0.convs.0.conv.weight"  # receives gradients (the coarsest DS head does not)
CUDA_TRAINERS = '''
from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP


class nnUNetTrainerBCP_cudatest(nnUNetTrainerBCP):
    """1 epoch of stage 1, then 2 of stage 2, 2 iterations each."""
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.bcp_pretrain_epochs = 1
        self.bcp_max_pretrain_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
'''


def _cuda_trainer(synthetic_3d, stage_two=True):
    from nnunetv2_bcp import nnUNetTrainerBCP
    plans = load_json(join(synthetic_3d["preprocessed"], "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(join(synthetic_3d["preprocessed"], "dataset.json"))
    trainer = nnUNetTrainerBCP(plans, "3d_fullres", 0, dataset_json, torch.device("cuda"))
    trainer.initialize()
    if stage_two:  # what on_train_epoch_start does at the stage change
        from nnunetv2_bcp.bcp import unwrap_network
        trainer.current_epoch = trainer.pretrain_epochs()
        trainer.teacher.load_state_dict(unwrap_network(trainer.network).state_dict())
        trainer.bcp_teacher_initialized = True
    return trainer


def _batches(trainer, seed):
    """A labeled and an unlabeled batch on the CPU, as nnU-Net's loaders deliver them."""
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    labeled = {"data": torch.randn(2, 1, *patch, generator=g), "keys": ["a", "b"],
               "target": [torch.randint(0, 3, (2, 1, *[round(p * s) for p, s in zip(patch, scale)]), generator=g,
                                        dtype=torch.int16) for scale in trainer._get_deep_supervision_scales()]}
    return labeled, {"data": torch.randn(2, 1, *patch, generator=g), "keys": ["u", "v"]}


def _weights(module) -> dict:
    from nnunetv2_bcp.bcp import unwrap_network
    return {k: v.detach().clone() for k, v in unwrap_network(module).state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_two_step_under_autocast_and_the_scalers_skipped_step(synthetic_3d, monkeypatch):
    monkeypatch.setenv("nnUNet_compile", "f")
    trainer = _cuda_trainer(synthetic_3d)
    assert trainer.grad_scaler is not None  # nnU-Net's mixed precision on CUDA
    teacher_before = _weights(trainer.teacher)
    out = trainer.stage_two_step(*_batches(trainer, 0))
    figures = out["bcp"]
    assert np.isfinite(out["loss"]) and np.isfinite(figures["bcp_loss_labeled"].item())
    assert np.isfinite(figures["bcp_loss_unlabeled"].item())
    assert next(trainer.teacher.parameters()).dtype == torch.float32  # the EMA stays fp32 under autocast
    assert not _same(_weights(trainer.teacher), teacher_before)  # a real step moves the teacher

    # loss scale overflow (finite loss, inf gradient): the scaler skips optimizer.step; the EMA must not run either
    # (the teacher would otherwise drift towards a student that did not learn from this batch)
    student, teacher = _weights(trainer.network), _weights(trainer.teacher)
    scale = trainer.grad_scaler.get_scale()
    conv = dict(trainer.network.named_parameters())[FIRST_CONV]
    hook = conv.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        skipped = trainer.stage_two_step(*_batches(trainer, 1))
    finally:
        hook.remove()
    assert trainer.grad_scaler.get_scale() < scale, "the scaler did not see the inf gradient"
    # routine for mixed precision, as in nnU-Net: the step's finite loss, no warning, nothing counted toward the abort
    assert np.isfinite(skipped["loss"]) and trainer.bcp_nonfinite_in_a_row == 0
    assert "non-finite" not in open(trainer.log_file).read()
    assert _same(_weights(trainer.network), student), "the student changed on a skipped step"
    assert _same(_weights(trainer.teacher), teacher), "the EMA teacher changed on a step the grad scaler skipped"

    out = trainer.stage_two_step(*_batches(trainer, 2))  # and training goes on at the lower scale
    assert np.isfinite(out["loss"]) and not _same(_weights(trainer.teacher), teacher)


def test_compiled_student_with_ema_teacher_survives_checkpoint_and_resume(synthetic_3d, monkeypatch, tmp_path):
    from torch._dynamo import OptimizedModule
    monkeypatch.setenv("nnUNet_compile", "t")
    trainer = _cuda_trainer(synthetic_3d)
    assert isinstance(trainer.network, OptimizedModule), "nnU-Net did not compile the student"
    assert not isinstance(trainer.teacher, OptimizedModule)  # the teacher is a plain fp32 module
    assert trainer.teacher_forward._orig_mod is trainer.teacher  # whose forward pass is compiled like the student's
    bcp_loss = trainer.bcp_loss.loss if isinstance(trainer.bcp_loss, DeepSupervisionWrapper) else trainer.bcp_loss
    assert bcp_loss.sums_nnunets_dice  # nnU-Net compiled its Dice module too: the loss still uses its own sums
    trainer.bcp_ema_decay = 0.9
    expected = trainer.teacher.state_dict()[FIRST_CONV].clone()
    for step in range(2):
        assert np.isfinite(trainer.stage_two_step(*_batches(trainer, step))["loss"])
        expected = 0.9 * expected + 0.1 * _weights(trainer.network)[FIRST_CONV].float()
    assert torch.allclose(trainer.teacher.state_dict()[FIRST_CONV], expected, atol=1e-6)

    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert not [k for k in checkpoint["network_weights"] if "_orig_mod" in k]  # loadable without compile
    student, teacher, iteration = _weights(trainer.network), _weights(trainer.teacher), trainer.bcp_iteration

    resumed = _cuda_trainer(synthetic_3d, stage_two=False)  # what --c does: a fresh (compiled) trainer loads it
    resumed.load_checkpoint(path)
    assert resumed.in_stage_two() and resumed.bcp_iteration == iteration
    assert _same(_weights(resumed.network), student) and _same(_weights(resumed.teacher), teacher)
    assert np.isfinite(resumed.stage_two_step(*_batches(resumed, 3))["loss"])
    assert not _same(_weights(resumed.teacher), teacher)


def test_largest_component_filter_runs_on_the_gpu_and_equals_cc3d():
    from nnunetv2_bcp.bcp import keep_largest_component
    noise = torch.nn.functional.avg_pool3d(torch.randn(3, 1, 48, 56, 40, generator=torch.Generator().manual_seed(0)),
                                           5, stride=1, padding=2)
    labels = torch.bucketize(noise, torch.tensor([0.1, 0.2])).to(torch.int16)
    on_gpu = keep_largest_component(labels.cuda())  # CUDA tensors are filtered on the device by default
    assert on_gpu.is_cuda and on_gpu.dtype == torch.int16
    assert torch.equal(on_gpu.cpu(), keep_largest_component(labels))
    regions = noise > 0.1
    assert torch.equal(keep_largest_component(regions.cuda(), True).cpu(), keep_largest_component(regions, True))


def test_streams_pin_memory_on_cuda(synthetic_3d, monkeypatch):
    from nnunetv2_bcp.unlabeled.loader import shutdown_stream
    monkeypatch.setenv("nnUNet_compile", "f")
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    trainer = _cuda_trainer(synthetic_3d, stage_two=False)
    labeled, validation = trainer.get_dataloaders()
    try:
        batch = next(trainer.dataloader_unlabeled)
        assert batch["data"].is_pinned(), "unlabeled batches are not in pinned memory"
        assert next(labeled)["data"].is_pinned()
        unlabeled_cases = {f[:-len(".nii.gz")].rsplit("_", 1)[0]
                           for f in os.listdir(join(synthetic_3d["raw"], "imagesUnlabeled"))}
        assert set(batch["keys"]) <= unlabeled_cases
        on_gpu = batch["data"].to(trainer.device, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), batch["data"])
        trainer.teacher.load_state_dict(trainer.network.state_dict())
        trainer.bcp_teacher_initialized = True
        assert np.isfinite(trainer.train_step(next(labeled))["loss"])  # stage 2 pulls from the pinned stream
    finally:
        for stream in (labeled, validation, trainer.dataloader_unlabeled):
            shutdown_stream(stream)


def test_nnunetv2_train_both_stages_and_predict_on_cuda(synthetic_3d, tmp_path):
    import nnunetv2_bcp
    import SimpleITK as sitk
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "bcp_cuda_trainers.py").write_text(CUDA_TRAINERS)
    # compile off: the compiled path is tested in-process above, and compiling here would double the run time
    env = {"nnUNet_extTrainer": os.pathsep.join([nnunetv2_bcp.ext_trainer_dir(), str(ext)]),
           "nnUNet_n_proc_DA": "2", "nnUNet_compile": "f"}
    trained = run_cli("nnUNetv2_train", str(synthetic_3d["id"]), "3d_fullres", "0", "-tr", "nnUNetTrainerBCP_cudatest",
                      "-device", "cuda", env=env)
    assert "BCP stage 1" in trained.stdout and "BCP stage 2" in trained.stdout
    assert "student-teacher agreement on unlabeled voxels" in trained.stdout
    model = join(os.environ["nnUNet_results"], os.path.basename(synthetic_3d["preprocessed"]),
                 "nnUNetTrainerBCP_cudatest__nnUNetPlans__3d_fullres")
    final = torch.load(join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3 and final["bcp"]["teacher_initialized"] and final["bcp"]["iteration"] == 4
    assert not torch.equal(final["network_weights"][FIRST_CONV], final["bcp"]["teacher_weights"][FIRST_CONV])
    assert os.path.isfile(join(model, "fold_0", "validation", "summary.json"))

    out = str(tmp_path / "predictions")
    run_cli("nnUNetv2_predict", "-i", join(synthetic_3d["raw"], "imagesTs"), "-o", out, "-d", str(synthetic_3d["id"]),
            "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerBCP_cudatest", "-device", "cuda", env=env)
    for case in ("test_000", "test_001"):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(join(out, case + ".nii.gz")))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(join(synthetic_3d["raw"], "labelsTs", case + ".nii.gz")))
        assert prediction.shape == reference.shape and set(np.unique(prediction)) <= {0, 1, 2}
