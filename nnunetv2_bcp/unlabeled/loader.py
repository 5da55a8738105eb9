"""The unlabeled data stream: random patches of unlabeled cases through nnU-Net's own loader and augmentation."""
import os
from typing import List, Optional, Sequence

import blosc2
import numpy as np
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset, nnUNetDatasetBlosc2
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunetv2_bcp.unlabeled.preprocess import empty_class_locations


class nnUNetUnlabeledDataLoader(nnUNetDataLoader):
    """nnU-Net's loader with random crops only: an unlabeled case has no foreground to oversample and no annotated
    voxels for the ignore-label sampling. Its ``target`` holds only the nonzero mask, never a label."""

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.has_ignore = False


class NonzeroMaskOfImage:
    """The 0/-1 segmentation channel of an image whose ``_seg`` file must not be opened, made from the image, per
    patch (only the cropped part of the image is read).

    nnU-Net writes -1 where the image lies outside its nonzero mask (``crop_to_nonzero``), and its training
    transforms use it only to set the channels normalised within that mask (``use_mask_for_norm``) to 0 there
    (``MaskImageTransform``); the BCP loss never sees an unlabeled target. Those channels hold exactly 0 outside
    the mask in nnU-Net's preprocessed image (its z-score leaves them untouched), so -1 here is: every
    mask-normalised channel is 0. That is nnU-Net's -1 region where the case was not resampled, and a subset of it
    where it was (voxels holding resampling residue stay 0, as they are at inference). Without mask-normalised
    channels the transforms use no -1 and this is 0 everywhere.
    """

    dtype = np.dtype(np.int8)

    def __init__(self, image, masked_channels: Sequence[int]):
        self.image = image
        self.masked_channels = list(masked_channels)
        self.shape = (1, *image.shape[1:])
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        spatial = tuple(index[1:])
        if not self.masked_channels:
            return np.zeros((1, *(len(range(*s.indices(n))) for s, n in zip(spatial, self.shape[1:]))), self.dtype)
        image = np.asarray(self.image[(slice(None), *spatial)])[self.masked_channels]
        return np.where((image == 0).all(0, keepdims=True), np.int8(-1), np.int8(0))


def open_image_only(folder: str, case: str):
    """A case's image from an nnU-Net preprocessed folder (blosc2, .npy or .npz) without touching its ``_seg`` file
    or its ``.pkl`` (which holds the label's ``class_locations``)."""
    if isfile(join(folder, case + ".b2nd")):
        mmap = {} if os.name == "nt" else {"mmap_mode": "r"}
        return blosc2.open(urlpath=join(folder, case + ".b2nd"), mode="r", dparams={"nthreads": 1}, **mmap)
    if isfile(join(folder, case + ".npy")):
        return np.load(join(folder, case + ".npy"), mmap_mode="r")
    return np.load(join(folder, case + ".npz"))["data"]  # npz members are read one by one: 'seg' stays unread


class UnlabeledDataset(nnUNetBaseDataset):
    """The cases of the unlabeled stream, from two places:

    - ``cases`` in ``folder``: images of ``imagesUnlabeled`` preprocessed by :mod:`nnunetv2_bcp.unlabeled.preprocess`
      (nnU-Net's format, ``_seg`` = nonzero mask);
    - ``label_dropped`` in ``nnunet_folder``: training cases whose labels a label subset drops, read in place from
      nnU-Net's own preprocessed folder (the image nnU-Net made is the one we would make). Only their image file is
      opened; the seg channel is :class:`NonzeroMaskOfImage` and the properties are empty ``class_locations``.
    """

    def __init__(self, folder: str, cases: Sequence[str], nnunet_folder: str, label_dropped: Sequence[str],
                 label_manager, use_mask_for_norm: Optional[Sequence[bool]] = None):
        clash = sorted(set(cases) & set(label_dropped))
        assert not clash, f"cases both unlabeled and label-dropped: {clash[:5]}"
        super().__init__(folder, sorted(cases) + sorted(label_dropped))
        self.preprocessed = nnUNetDatasetBlosc2(folder, sorted(cases))
        self.nnunet_folder = nnunet_folder
        self.label_dropped = set(label_dropped)
        self.masked_channels = [c for c, m in enumerate(use_mask_for_norm or []) if m]
        self.properties = {"class_locations": empty_class_locations(label_manager)}

    def load_case(self, identifier):
        if identifier not in self.label_dropped:
            return self.preprocessed.load_case(identifier)
        image = open_image_only(self.nnunet_folder, identifier)
        return image, NonzeroMaskOfImage(image, self.masked_channels), None, self.properties

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("UnlabeledDataset only reads")

    @staticmethod
    def get_identifiers(folder: str) -> List[str]:
        return nnUNetDatasetBlosc2.get_identifiers(folder)


def unlabeled_augmentation_workers(total: int) -> int:
    """Workers of the unlabeled stream for nnU-Net's ``nnUNet_n_proc_DA`` budget ``total``: half of it (at least 1;
    0 keeps it single-threaded).

    nnU-Net's labeled stream keeps the whole budget. The unlabeled stream's workers start only at its first batch
    (stage 2), so stage 1 runs exactly as nnU-Net does. In stage 2 the two streams run 1.5x ``total`` processes and
    share the CPUs through the operating system: each step takes one batch from each stream, a worker whose queue
    is full sleeps, so the busy stream gets the idle one's CPU time; the unlabeled stream's half of the processes
    is what it needs when loading is the bottleneck.
    """
    return 0 if total <= 0 else max(1, total // 2)


def make_unlabeled_stream(dataset, batch_size: int, initial_patch_size, patch_size, label_manager, transforms,
                          num_processes: Optional[int] = None, pin_memory: bool = False,
                          seeds: Optional[List[int]] = None):
    """An endless iterator of augmented unlabeled batches ``{'data', 'target', 'keys'}`` (nnU-Net's augmenters). Its
    worker processes start at the first ``next()``."""
    if num_processes is None:
        num_processes = unlabeled_augmentation_workers(get_allowed_n_proc_DA())
    loader = nnUNetUnlabeledDataLoader(dataset, batch_size, initial_patch_size, patch_size, label_manager,
                                       transforms=transforms)
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=max(6, num_processes // 2), seeds=seeds, pin_memory=pin_memory,
                                        wait_time=0.002)


def shutdown_stream(stream) -> None:
    """Stop the worker processes of a stream made by :func:`make_unlabeled_stream` (idempotent)."""
    if isinstance(stream, NonDetMultiThreadedAugmenter):
        stream._finish()
