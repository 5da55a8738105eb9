"""A small synthetic nnU-Net dataset with labeled, unlabeled and test cases (for the demo and the tests).

Each volume holds two touching ellipsoids (labels 1 and 2) in noisy background, with per-case intensity scale
and offset (like MRI) and a random position/size, so that a segmentation model has something to learn.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p, save_json


def synthetic_case(rng: np.random.Generator, shape: Sequence[int], num_channels: int = 1,
                   spacing: Sequence[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(image (C, *shape) float32, label (*shape) uint8) of one random case, 2D or 3D."""
    shape = tuple(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    center = np.array([rng.uniform(0.35, 0.65) * s for s in shape])
    radii = np.array([rng.uniform(0.15, 0.25) * s for s in shape])
    dist = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)))
    label = np.zeros(shape, dtype=np.uint8)
    label[dist < 1] = 1
    label[(dist < 1) & (grid[-1] > center[-1])] = 2  # the two halves of the object: two touching classes
    images = []
    for c in range(num_channels):
        contrast = np.array([0.0, 1.0 + 0.3 * c, 1.8 - 0.2 * c], dtype=np.float32)
        image = contrast[label] + rng.normal(0, 0.35, shape).astype(np.float32)
        scale, offset = rng.uniform(50, 400), rng.uniform(0, 500)  # scan-to-scan intensity differences
        images.append((image * scale + offset).astype(np.float32))
    return np.stack(images), label


def _write(array: np.ndarray, path: str, spacing: Sequence[float]) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(image, path)


def make_synthetic_dataset(raw_root: str, dataset_id: int = 990, name: str = "BCPSynthetic", num_labeled: int = 4,
                           num_unlabeled: int = 8, num_test: int = 4, shape: Sequence[int] = (32, 32, 32),
                           num_channels: int = 1, spacing: Optional[Sequence[float]] = None, seed: int = 0,
                           regions: bool = False, ignore_label: bool = False) -> str:
    """Write ``DatasetXXX_Name`` into ``raw_root`` in nnU-Net's layout plus ``imagesUnlabeled`` and a labeled test
    set (``imagesTs``/``labelsTs``). Returns the dataset folder.

    ``regions``: dataset.json declares overlapping regions (whole object = labels 1+2, and label 2) for
    region-based training. ``ignore_label``: label 3 marks the first quarter (along the first axis) of every
    training label as not annotated (sparse annotation).
    """
    rng = np.random.default_rng(seed)
    spacing = tuple(spacing) if spacing is not None else (1.0,) * len(shape)
    folder = join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        maybe_mkdir_p(join(folder, sub))
    groups = [("imagesTr", "labelsTr", "case", num_labeled), ("imagesUnlabeled", None, "unl", num_unlabeled),
              ("imagesTs", "labelsTs", "test", num_test)]
    for image_dir, label_dir, prefix, count in groups:
        for i in range(count):
            images, label = synthetic_case(rng, shape, num_channels)
            case = f"{prefix}_{i:03d}"
            for c in range(num_channels):
                _write(images[c], join(folder, image_dir, f"{case}_{c:04d}.nii.gz"), spacing)
            if label_dir is not None:
                if ignore_label and label_dir == "labelsTr":
                    label[: max(1, shape[0] // 4)] = 3
                _write(label, join(folder, label_dir, f"{case}.nii.gz"), spacing)
    labels = {"background": 0, "whole": [1, 2], "right": 2} if regions else {"background": 0, "left": 1, "right": 2}
    if ignore_label:
        labels["ignore"] = 3
    dataset_json = {"channel_names": {str(c): f"MRI{c}" for c in range(num_channels)}, "labels": labels,
                    "numTraining": num_labeled, "file_ending": ".nii.gz", "name": name,
                    "description": "synthetic BCP demo data (nnunetv2_bcp)"}
    if regions:
        dataset_json["regions_class_order"] = [1, 2]
    save_json(dataset_json, join(folder, "dataset.json"), sort_keys=False)
    return folder
