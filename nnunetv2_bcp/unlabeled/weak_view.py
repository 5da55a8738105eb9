"""A weakly augmented view of each unlabeled patch for the teacher (``bcp_teacher_weak_view``).

FixMatch-style: the teacher labels the patch after the spatial transforms and mirroring only, the student learns on
the same patch with nnU-Net's intensity augmentation on top, so both see the same voxels at the same places. The
weak view travels as extra image channels (nnU-Net's loader keeps only ``image`` and ``segmentation``): a batch of
C-channel images becomes 2C channels, the first C the fully augmented view, the last C the weak one.
"""
from typing import List

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform

WEAK_VIEW_KEY = "bcp_weak_view"


class StashWeakView(BasicTransform):
    """Keeps a copy of the image as it is now (after the spatial transforms) under ``WEAK_VIEW_KEY``."""

    def apply(self, data_dict, **params):
        data_dict[WEAK_VIEW_KEY] = data_dict["image"].clone()
        return data_dict


class AppendWeakView(BasicTransform):
    """Appends the stashed weak view to the image's channels (the last transform of the pipeline)."""

    def apply(self, data_dict, **params):
        data_dict["image"] = torch.cat([data_dict["image"], data_dict.pop(WEAK_VIEW_KEY)])
        return data_dict


def with_weak_view(transforms: ComposeTransforms) -> ComposeTransforms:
    """nnU-Net's training transforms with the weak view taken after the spatial ones.

    nnU-Net mirrors after its intensity transforms; here mirroring moves right after the spatial transform so that
    the weak view is mirrored too. The intensity transforms (noise, blur, brightness, contrast, low resolution,
    gamma) act voxel-wise or with symmetric kernels, so applying them before or after a flip gives the same
    distribution of images.
    """
    steps: List[BasicTransform] = list(transforms.transforms)
    mirror = [t for t in steps if isinstance(t, MirrorTransform)]
    steps = [t for t in steps if not isinstance(t, MirrorTransform)]
    spatial_end = [i for i, t in enumerate(steps) if isinstance(t, (SpatialTransform, Convert2DTo3DTransform))]
    if not spatial_end:
        raise ValueError("with_weak_view needs nnU-Net's SpatialTransform in the pipeline")
    cut = spatial_end[-1] + 1
    return ComposeTransforms(steps[:cut] + mirror + [StashWeakView()] + steps[cut:] + [AppendWeakView()])


def split_views(images: torch.Tensor) -> tuple:
    """(fully augmented view, weak view) of a batch made with :func:`with_weak_view`."""
    channels = images.shape[1] // 2
    return images[:, :channels], images[:, channels:]
