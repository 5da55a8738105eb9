"""The unlabeled data stream: random patches of unlabeled cases through nnU-Net's own loader and augmentation."""
import os
from contextlib import contextmanager
from typing import List, Optional

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA


class nnUNetUnlabeledDataLoader(nnUNetDataLoader):
    """nnU-Net's loader with random crops only: an unlabeled case has no foreground to oversample and no annotated
    voxels for the ignore-label sampling. Its ``target`` holds only the nonzero mask, never a label."""

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.has_ignore = False


def split_augmentation_workers(total: int) -> tuple:
    """Share nnU-Net's ``nnUNet_n_proc_DA`` budget: (labeled, unlabeled) worker counts.

    Both streams load the same number of patches per step, so they get half each (labeled gets the odd one);
    0 keeps both single-threaded, 1 gives each stream one worker.
    """
    if total <= 0:
        return 0, 0
    return max(1, (total + 1) // 2), max(1, total // 2)


@contextmanager
def n_proc_da(value: int):
    """Temporarily set ``nnUNet_n_proc_DA`` so that nnU-Net's own ``get_dataloaders`` uses ``value`` workers."""
    old = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = str(value)
    try:
        yield
    finally:
        if old is None:
            del os.environ["nnUNet_n_proc_DA"]
        else:
            os.environ["nnUNet_n_proc_DA"] = old


def make_unlabeled_stream(dataset, batch_size: int, initial_patch_size, patch_size, label_manager, transforms,
                          num_processes: Optional[int] = None, pin_memory: bool = False, seeds: Optional[List[int]] = None):
    """An endless iterator of augmented unlabeled batches ``{'data', 'target', 'keys'}`` (nnU-Net's augmenters)."""
    if num_processes is None:
        num_processes = split_augmentation_workers(get_allowed_n_proc_DA())[1]
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
