"""bcp_teacher_weak_view: the teacher labels each unlabeled patch after the spatial transforms only, the student
learns on the same patch with nnU-Net's intensity augmentation on top."""
import numpy as np
import torch
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from test_trainer import _batches, trainer  # noqa: F401 (fixture)
from nnunetv2_bcp.unlabeled.weak_view import StashWeakView, split_views, with_weak_view


def _nnunet_transforms(patch, mirror_axes=(0, 1, 2)):
    return nnUNetTrainer.get_training_transforms(patch, (-0.1, 0.1), None, mirror_axes, False,
                                                 use_mask_for_norm=[False], is_cascaded=False)


def _set_intensity_probability(transforms, probability):
    for t in transforms.transforms:
        if isinstance(t, RandomTransform):
            t.apply_prob = probability


def test_weak_view_has_the_geometry_of_the_full_view_without_its_intensity_augmentation():
    patch = (16, 20, 12)
    transforms = with_weak_view(_nnunet_transforms(patch))
    kinds = [type(t) for t in transforms.transforms]
    assert kinds.index(MirrorTransform) == kinds.index(StashWeakView) - 1  # mirrored before the copy is taken
    image = torch.arange(16 * 20 * 12, dtype=torch.float32).reshape(1, *patch) / 1000
    seg = torch.zeros(1, *patch, dtype=torch.int16)
    torch.manual_seed(0)
    np.random.seed(0)  # the spatial transform draws with numpy
    _set_intensity_probability(transforms, 0.0)
    spatial = next(t for t in transforms.transforms if isinstance(t, SpatialTransform))
    spatial.p_rotation = spatial.p_scaling = 1.0  # the geometry always changes
    out = transforms(image=image.clone(), segmentation=seg.clone())["image"]
    strong, weak = split_views(out[None])
    assert out.shape[0] == 2 and torch.equal(strong, weak)  # nothing but geometry: the views are the same
    assert not torch.allclose(weak.reshape(image.shape), image)  # ... and the weak view has that geometry
    _set_intensity_probability(transforms, 1.0)
    for t in transforms.transforms:  # keep only the noise, always on
        if isinstance(t, RandomTransform) and not isinstance(t.transform, GaussianNoiseTransform):
            t.apply_prob = 0.0
    out = transforms(image=image.clone(), segmentation=seg.clone())["image"]
    strong, weak = split_views(out[None])
    noise = strong - weak
    assert noise.abs().max() > 0 and noise.abs().mean() < 0.5 * weak.std()  # same voxels, noise on top


def test_the_teacher_labels_the_weak_half_and_the_student_sees_the_full_half(trainer):
    trainer.bcp_teacher_weak_view = True
    labeled, unlabeled = _batches(trainer, 0)
    full = unlabeled["data"]
    weak = torch.randn_like(full)
    unlabeled = {"data": torch.cat([full, weak], 1), "keys": unlabeled["keys"]}
    seen = {}
    make_pseudo_labels = trainer.make_pseudo_labels

    def spy(images):
        seen["teacher"] = images.clone()
        return make_pseudo_labels(images)

    trainer.make_pseudo_labels = spy
    passes = []
    hook = trainer.network.register_forward_pre_hook(lambda module, args: passes.append(args[0].clone()))
    try:
        trainer.stage_two_step(labeled, unlabeled)
    finally:
        hook.remove()
    assert torch.equal(seen["teacher"], weak)
    student = passes[0]  # the mixed patches (the default's un-mixed labeled patches pass after them)
    assert len(passes) == 2 and torch.equal(passes[1], labeled["data"])
    assert student.shape[1] == full.shape[1]
    from_unlabeled = ~torch.isclose(student, labeled["data"])  # voxels pasted from the unlabeled patches
    assert from_unlabeled.any() and torch.equal(student[from_unlabeled], full[from_unlabeled])
    assert trainer.bcp_settings()["bcp_teacher_weak_view"] is True
