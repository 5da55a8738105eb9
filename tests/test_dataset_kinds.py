"""BCP on the kinds of dataset nnU-Net accepts.

In process, per kind (multi-channel + 2d, regions + ignore label, ignore label with an odd batch size, batch size 1,
ResEnc plans, anisotropic spacing; three datasets in all): one stage-1 and one stage-2 step on batches in the layout
of the trainer's own loaders, whose images and labels are replaced by values that name their source patch, so that
every voxel of the mixed images and of the mixed targets at every deep-supervision scale can be traced back to where
it came from.

Through nnU-Net's commands: 3d_lowres trained and predicted (the other command-line paths, --c, --val and prediction
against the synthetic truth, are in test_trainer.py); the cascade refused with a message."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from conftest import foreground_dice, plan_and_preprocess, run_cli
from test_trainer import ext_trainer_env  # noqa: F401  (fixture)

SHARED = 990  # the session's Dataset990 (32^3, one channel), see conftest.synthetic_3d
# datasets of their own, each planned once for the configurations its kinds use (the ignore label and regions change
# nnU-Net's preprocessing: the class locations it stores for sampling patches)
DATASETS = {
    981: ("TwoChannelsAnisotropicIgnore", dict(num_channels=2, shape=(12, 40, 40), spacing=(3.0, 1.0, 1.0),
                                               ignore_label=True), ("2d", "3d_fullres")),
    982: ("RegionsIgnore", dict(regions=True, ignore_label=True, shape=(16, 16, 16)), ("3d_fullres",)),
}
KINDS = {
    # name: (dataset id, configuration, batch size override, plans name)
    "two_channels_2d": (981, "2d", None, "nnUNetPlans"),
    "regions_ignore_3d": (982, "3d_fullres", None, "nnUNetPlans"),
    "ignore_odd_batch_3d": (981, "3d_fullres", 3, "nnUNetPlans"),
    "batch_size_one_3d": (SHARED, "3d_fullres", 1, "nnUNetPlans"),
    "resenc_plans_3d": (SHARED, "3d_fullres", None, "nnUNetResEncUNetMPlans"),
    "anisotropic_3d": (981, "3d_fullres", None, "nnUNetPlans"),
}


@pytest.fixture(scope="module")
def planned_datasets(nnunet_dirs):
    """Dataset id -> preprocessed folder of the DATASETS (5 labeled + 3 unlabeled cases), made when first asked for."""
    from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset
    folders = {}

    def folder_of(dataset_id):
        if dataset_id not in folders:
            name, options, configurations = DATASETS[dataset_id]
            raw = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], dataset_id, name, num_labeled=5,
                                         num_unlabeled=3, num_test=0, **options)
            plan_and_preprocess(dataset_id, configurations)
            folders[dataset_id] = join(nnunet_dirs["nnUNet_preprocessed"], os.path.basename(raw))
        return folders[dataset_id]
    return folder_of


def _plans(kind, request):
    """(plans dict, dataset.json, preprocessed folder) of a kind, planned and preprocessed by nnU-Net."""
    dataset_id, configuration, batch_size, plans_name = KINDS[kind]
    if dataset_id == SHARED:
        preprocessed = request.getfixturevalue("synthetic_3d")["preprocessed"]
    else:
        preprocessed = request.getfixturevalue("planned_datasets")(dataset_id)
    if plans_name == "nnUNetResEncUNetMPlans":
        from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
            nnUNetPlannerResEncM
        from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
        plan_experiment_dataset(dataset_id, nnUNetPlannerResEncM)
    plans = load_json(join(preprocessed, plans_name + ".json"))
    if plans_name != "nnUNetPlans":  # ResEnc changes the network, not the preprocessing: reuse nnUNetPlans' data
        default = load_json(join(preprocessed, "nnUNetPlans.json"))["configurations"][configuration]
        assert plans["configurations"][configuration]["spacing"] == default["spacing"]
        plans["configurations"][configuration]["data_identifier"] = default["data_identifier"]
    if batch_size is not None:
        plans["configurations"][configuration]["batch_size"] = batch_size
    return dict(plans, continue_training=False), load_json(join(preprocessed, "dataset.json")), preprocessed


def _labels_of(batch, lm, generator):
    """Random labeled targets in the layout of ``batch['target']`` that never hold the teacher's class 1: label maps
    use {0, 2} (and the ignore label); regions have region 2 on (and a random ignore channel)."""
    targets = []
    for t in batch["target"]:
        if lm.has_regions:
            new = torch.randint(0, 2, t.shape, generator=generator)
            new[:, 1] = 1
        else:
            values = torch.tensor([0, 2] + ([lm.ignore_label] if lm.has_ignore_label else []))
            new = values[torch.randint(0, len(values), t.shape, generator=generator)]
        targets.append(new.to(t.dtype))
    return targets


def _pseudo_slabs(batch, shape, patch_side, stride):
    """Where the teacher labels class (region) 1 in unlabeled patch j, on a grid of ``shape``: a slab along the last
    axis whose width depends on j, with its edge on the coarsest grid (``stride``) so that it is exact at every scale;
    bool (B, *shape)."""
    cuts = torch.tensor([(j + 1) * (patch_side // stride) // (batch + 1) for j in range(batch)]) * stride
    position = torch.arange(shape[-1]) * (patch_side // shape[-1])
    return (position < cuts.view(-1, *[1] * len(shape))).expand(batch, *shape)


def _pseudo_targets(slabs, target, lm):
    """The teacher's pseudo-labels in the layout of a labeled ``target`` (regions: region 2 off, ignore channel 0)."""
    if lm.has_regions:
        pseudo = torch.zeros_like(target)
        pseudo[:, 0] = slabs
        return pseudo
    return slabs.unsqueeze(1).to(target.dtype)


def _teacher_labels_slabs(trainer, batch, patch, stride):
    """Overrides the teacher's logits (a forward hook; the teacher stays the trainer's) with ``_pseudo_slabs`` of the
    unlabeled patch it is given, recognised by its code."""
    regions = trainer.label_manager.has_regions

    def hook(module, args, output):
        logits = torch.full_like(output, -10.0)
        codes = args[0][:, 0].flatten(1)[:, 0].round().long()
        slabs = _pseudo_slabs(batch, patch, patch[-1], stride[-1])[-codes - 1]
        logits[:, 0] = torch.where(slabs, 10.0, -10.0) if regions else torch.where(slabs, -10.0, 10.0)
        if not regions:
            logits[:, 1] = torch.where(slabs, 10.0, -10.0)
        return logits

    trainer.teacher.register_forward_hook(hook)


def _images(codes, num_channels):
    """Image of a patch code per voxel: labeled patch j is j + 1 + 10c in channel c, unlabeled patch j -(j + 1 + 10c).
    ``codes``: (B, *spatial) int."""
    return torch.stack([codes.sign() * (codes.abs() + 10 * c) for c in range(num_channels)], 1).float()


def _subsample(codes, shape):
    """``codes`` (B, *full) at a deep-supervision scale; asserts that every coarse voxel covers voxels of one source
    only (the box sits on the coarsest grid)."""
    factors = [f // s for f, s in zip(codes.shape[1:], shape)]
    coarse = codes[(slice(None), *(slice(None, None, f) for f in factors))]
    assert tuple(coarse.shape[1:]) == tuple(shape)
    up = coarse
    for axis, f in enumerate(factors):
        up = up.repeat_interleave(f, dim=axis + 1)
    assert torch.equal(up, codes), "a coarse target voxel covers two sources"
    return coarse


def _box_of(region):
    """(start, size) per axis if the bool map ``region`` is exactly one box, else None."""
    nonzero = region.nonzero()
    start, stop = nonzero.min(0).values, nonzero.max(0).values + 1
    box = torch.zeros_like(region)
    box[tuple(slice(a, b) for a, b in zip(start.tolist(), stop.tolist()))] = True
    return (start.tolist(), (stop - start).tolist()) if torch.equal(box, region) else None


def _check_mixing(trainer, codes, sources, box_inside):
    """Every mixed sample holds two sources, one of them in BCP's box (size, stride grid); returns per sample whether
    the box holds the source for which ``box_inside(code)`` is True."""
    from nnunetv2_bcp.bcp import box_size
    patch, stride = trainer.configuration_manager.patch_size, trainer.bcp_box_stride()
    size = list(box_size(patch, trainer.bcp_mask_ratio, stride))
    inside = []
    for sample in codes:
        present = sample.unique().tolist()
        assert len(present) == 2 and set(present) <= sources, present
        boxes = {c: _box_of(sample == c) for c in present}
        boxed = [c for c, b in boxes.items() if b is not None and b[1] == size]
        assert len(boxed) == 1, boxes
        start = boxes[boxed[0]][0]
        assert all(a % s == 0 for a, s in zip(start, stride)), (start, stride)
        inside.append(box_inside(boxed[0]))
    return inside


def _check_targets(targets, codes, source_targets):
    """Each scale's mixed target equals, voxel by voxel, the target of the patch the mixed image's voxel came from.
    ``source_targets(scale)``: (S, C, ...) targets of the sources at that scale, indexed by ``code_index``."""
    for scale, target in enumerate(targets):
        coarse = _subsample(codes, target.shape[2:])
        index = torch.where(coarse > 0, coarse - 1, len(codes) - coarse - 1)  # labeled j -> j, unlabeled j -> B + j
        expected = torch.gather(source_targets(scale), 0, index.unsqueeze(1).expand_as(target).long())
        assert torch.equal(target, expected), f"deep-supervision scale {scale}"


class _Recorder:
    """The positional arguments of every call of a module (a forward pre-hook: the module itself is untouched)."""

    def __init__(self, module):
        self.calls = []
        module.register_forward_pre_hook(lambda m, args: self.calls.append(args))


@pytest.mark.parametrize("kind", list(KINDS))
def test_mixed_inputs_and_targets_of_both_stages(kind, request, tmp_path, monkeypatch):
    from nnunetv2_bcp import nnUNetTrainerBCP
    from nnunetv2_bcp.unlabeled.loader import shutdown_stream
    plans, dataset_json, preprocessed = _plans(kind, request)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # single-threaded loaders (nnU-Net's planner needs it unset)
    configuration = KINDS[kind][1]
    trainer = nnUNetTrainerBCP(plans, configuration, 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    lm = trainer.label_manager
    loader, _ = trainer.get_dataloaders()
    try:
        labeled, unlabeled = next(loader), next(trainer.dataloader_unlabeled)
    finally:
        shutdown_stream(trainer.dataloader_unlabeled)

    # the loaders' layout for this kind
    batch = plans["configurations"][configuration]["batch_size"]
    patch = tuple(trainer.configuration_manager.patch_size)
    channels = len(dataset_json["channel_names"])
    scales = trainer._get_deep_supervision_scales()
    target_channels = len(lm.foreground_regions) + lm.has_ignore_label if lm.has_regions else 1
    assert labeled["data"].shape == unlabeled["data"].shape == (batch, channels, *patch)
    assert [tuple(t.shape) for t in labeled["target"]] == [
        (batch, target_channels, *(round(p * s) for p, s in zip(patch, sc))) for sc in scales]
    arch = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    assert list(trainer.bcp_box_stride()) == np.prod(arch["strides"][:-1], axis=0).tolist()
    if kind == "anisotropic_3d":
        assert len(set(trainer.bcp_box_stride())) > 1

    # labeled patch j is j + 1 everywhere, unlabeled patch j -(j + 1); labels random, never the pseudo-label
    generator = torch.Generator().manual_seed(0)
    codes = torch.arange(1, batch + 1).view(-1, *[1] * len(patch)).expand(batch, *patch)
    labeled = dict(labeled, data=_images(codes, channels), target=_labels_of(labeled, lm, generator))
    unlabeled = dict(unlabeled, data=_images(-codes, channels))
    network, loss, bcp_loss = (_Recorder(m) for m in (trainer.network, trainer.loss, trainer.bcp_loss))

    # the paper's stage 1 (nnUNetTrainerBCP_paperStageOne; the default's is nnU-Net's own step): patches of the
    # labeled batch pasted into each other, their labels with them
    trainer.bcp_stage_one = "copy_paste"
    out = trainer.train_step(labeled)
    assert np.isfinite(out["loss"])
    images, = network.calls[0]
    mixed_codes = images[:, 0].round().long()
    assert torch.equal(images, _images(mixed_codes, channels))  # every channel from the same source
    if batch == 1:  # the patch's only partner is itself
        assert torch.equal(mixed_codes, codes)
    else:
        _check_mixing(trainer, mixed_codes, set(range(1, batch + 1)), lambda code: True)
    _check_targets(loss.calls[0][1], mixed_codes, lambda scale: labeled["target"][scale])

    # stage 2: a teacher whose pseudo-labels name their patch; labeled and unlabeled patches pasted both ways
    stride = trainer.bcp_box_stride()
    _teacher_labels_slabs(trainer, batch, patch, stride)
    trainer.bcp_teacher_initialized = True
    trainer.dataloader_unlabeled = iter([unlabeled])
    network.calls.clear()
    out = trainer.train_step(labeled)
    assert np.isfinite(out["loss"])
    slab_share = _pseudo_slabs(batch, patch, patch[-1], stride[-1]).float().mean().item()
    figures = out.get("bcp", out)  # the trainer's per-step figures (a sub-dict of tensors in newer versions)
    assert torch.allclose(torch.as_tensor(figures["bcp_pseudo_fg_fraction"]).cpu().double(),
                          torch.tensor([slab_share, 0.0], dtype=torch.double))
    images = network.calls[0][0][:batch]
    mixed_codes = images[:, 0].round().long()
    assert torch.equal(images, _images(mixed_codes, channels))
    sources = set(range(1, batch + 1)) | set(range(-batch, 0))
    inward = _check_mixing(trainer, mixed_codes, sources, lambda code: code < 0)  # X^in: the unlabeled box
    assert abs(2 * sum(inward) - batch) <= 1  # half of the batch goes each way (an odd one's spare either way)
    for j in range(1, batch + 1):  # every labeled and every unlabeled patch is used once
        assert sum(bool((s == j).any()) for s in mixed_codes) == 1
        assert sum(bool((s == -j).any()) for s in mixed_codes) == 1
    outputs, targets, from_labeled, *rest = bcp_loss.calls[0]
    assert len(outputs) == len(targets) == len(from_labeled) == len(scales)
    for output, target, mask in zip(outputs, targets, from_labeled):
        assert output.shape[2:] == target.shape[2:] and output.shape[0] == batch
        assert torch.equal(mask.bool(), _subsample(mixed_codes, target.shape[2:]).unsqueeze(1) > 0)
    if rest:  # BCPLoss' X^in flags, one per scale
        assert all(torch.equal(r.cpu(), torch.tensor(inward)) for r in rest[0])
    pseudo = [_pseudo_targets(_pseudo_slabs(batch, t.shape[2:], patch[-1], stride[-1]), t, lm)
              for t in labeled["target"]]
    _check_targets(targets, mixed_codes, lambda scale: torch.cat([labeled["target"][scale], pseudo[scale]]))

    # what a resumed run would load: the teacher comes back, and the plans (ResEnc: another name) are accepted
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    with torch.no_grad():
        trainer.teacher.decoder.seg_layers[-1].bias.add_(1)
    trainer.load_checkpoint(path)
    assert all(torch.equal(v, teacher[k]) for k, v in trainer.teacher.state_dict().items())
    assert trainer.in_stage_two()


# A small GPU memory target makes nnU-Net's own planner choose a patch far smaller than these 48^3 images, so it
# plans 3d_lowres and 3d_cascade_fullres as it would for large CT volumes.
SMALL_GPU_PLANS = dict(gpu_memory_target=0.02, plans_name="nnUNetPlansSmallGPU")
# iterations per epoch: 20 in all were enough for a Dice of 0.93 on the test case (0.90 with 8)
LOWRES_ITERATIONS = 5


@pytest.mark.heavy(2)
def test_lowres_trains_and_predicts_and_the_cascade_is_refused(nnunet_dirs, ext_trainer_env, tmp_path):  # noqa: F811
    from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset
    dataset_id, configuration, plans_name, shape = 987, "3d_lowres", "nnUNetPlansSmallGPU", (48, 48, 48)
    folder = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], dataset_id, "lowres3d", num_labeled=5,
                                    num_unlabeled=3, num_test=1, shape=shape)
    # nnU-Net's 3d_lowres validation also exports segmentations for the cascade, at 3d_fullres' preprocessing
    plan_and_preprocess(dataset_id, (configuration, "3d_fullres"), **SMALL_GPU_PLANS)
    name = os.path.basename(folder)
    plans_file = join(nnunet_dirs["nnUNet_preprocessed"], name, plans_name + ".json")
    plans = load_json(plans_file)["configurations"]
    assert plans[configuration]["spacing"][0] > 1.2 and "3d_cascade_fullres" in plans
    env = dict(ext_trainer_env, nnUNet_n_proc_DA="0", BCP_TEST_ITERATIONS=str(LOWRES_ITERATIONS))
    trained = run_cli("nnUNetv2_train", str(dataset_id), configuration, "0", "-tr", "nnUNetTrainerBCP_test", "-p",
                      plans_name, "-device", "cpu", env=env)
    assert "student-teacher agreement on unlabeled voxels" in trained.stdout
    fold = join(nnunet_dirs["nnUNet_results"], name, f"nnUNetTrainerBCP_test__{plans_name}__{configuration}", "fold_0")
    final = torch.load(join(fold, "checkpoint_final.pth"), weights_only=False, map_location="cpu")
    assert final["bcp"]["iteration"] == 2 * LOWRES_ITERATIONS
    progress = load_json(join(fold, "bcp_progress.json"))
    assert len(progress[-1]["bcp_pseudo_fg_fraction"]) == 2 and all(np.isfinite(p["bcp_loss_unlabeled"])
                                                                    for p in progress)
    # the preprocessed unlabeled cases are at 3d_lowres' spacing
    unlabeled = join(nnunet_dirs["nnUNet_preprocessed"], name, plans[configuration]["data_identifier"] + "_unlabeled")
    assert len(load_json(join(unlabeled, "bcp_unlabeled.json"))["cases"]) == 3
    dataset = nnUNetDatasetBlosc2(unlabeled)
    data = dataset.load_case(dataset.identifiers[0])[0]
    assert data.shape[1:] == tuple(plans[configuration]["median_image_size_in_voxels"])  # 29^3, not 48^3

    out = str(tmp_path / "pred")
    run_cli("nnUNetv2_predict", "-i", join(folder, "imagesTs"), "-o", out, "-d", str(dataset_id), "-c",
            configuration, "-f", "0", "-tr", "nnUNetTrainerBCP_test", "-p", plans_name, "-device", "cpu", "-npp", "0",
            "-nps", "0", env=env)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(join(out, "test_000.nii.gz")))
    assert pred.shape == shape and set(np.unique(pred)) <= {0, 1, 2}
    reference = sitk.GetArrayFromImage(sitk.ReadImage(join(folder, "labelsTs", "test_000.nii.gz")))
    # a prediction from an untrained or broken model (all background) fails here, not only a wrong shape
    assert foreground_dice(pred, reference) > 0.5

    # the cascade: refused when the trainer is set up, before any data work (a SystemExit, which nnUNetv2_train
    # prints as its message without a traceback, as test_trainer's refusal through the command shows)
    from nnunetv2_bcp import nnUNetTrainerBCP
    cascade = nnUNetTrainerBCP(dict(load_json(plans_file), continue_training=False), "3d_cascade_fullres", 0,
                               load_json(join(nnunet_dirs["nnUNet_preprocessed"], name, "dataset.json")),
                               torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"cascade configurations \(3d_cascade_fullres\) are not supported"):
        cascade.initialize()
