"""Checkpoints of BCP trainers: nnU-Net's checkpoint plus a ``bcp`` entry, written once and atomically.

nnU-Net 2.8's ``save_checkpoint`` builds its dict and calls ``torch.save`` with no hook for extra keys, and its
``load_checkpoint`` only takes a path (a dict argument fails). Rather than copying those methods (the copy would go
stale with nnU-Net's next release) or swapping ``torch.save`` / ``torch.load`` while they run (which would hand a
subclass's own ``torch.load`` in ``initialize`` the checkpoint), the BCP trainer lets nnU-Net serialise its dict into
memory, adds its entry and writes the file once, through a temporary file renamed over the target (a crash mid-write
leaves the previous checkpoint intact); it reads its own entry from a memory-mapped load and lets nnU-Net's
``load_checkpoint`` read the file as it always does.
"""
import glob
import io
import os
import pickle
from typing import Callable

import numpy as np
import torch

TEMPORARY_SUFFIX = ".tmp"
# What nnU-Net's checkpoints hold besides tensors and Python's own types: numpy scalars (in the training log, the best
# EMA Dice) with their dtypes. The scalar's reconstructor is looked up where this numpy version keeps it.
NUMPY_CHECKPOINT_GLOBALS = [np.array(0.0)[()].__reduce__()[0], np.dtype] + \
    [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8,
                                 np.bool_)]


class UntrustedCheckpointError(ValueError):
    """A checkpoint that holds more than tensors, numbers and Python's containers: unpickling it could run code."""


class UnreadableCheckpointError(ValueError):
    """A file that is not a PyTorch checkpoint, or one cut short."""


def _unreadable(path: str, error: Exception) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                                     f"{error}); is it a .pth that was copied completely?")


def load_checkpoint(path: str, map_location="cpu", mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=False)`` as nnU-Net loads its checkpoints (for files this training wrote or
    the user vouches for); a file that is not a checkpoint raises :class:`UnreadableCheckpointError` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, KeyError or EOFError by the damage
        raise _unreadable(path, error) from None


def load_checkpoint_without_code(path: str, map_location="cpu", mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)``, allowing the numpy scalars nnU-Net's checkpoints hold: a file that
    needs any other global (a pickled object, which can run a command when loaded) is refused with the reason.
    ``mmap``: tensors are mapped, not read, until used (for a look at the checkpoint's other entries)."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise UntrustedCheckpointError(f"torch {torch.__version__} cannot load {path} as weights and numbers only "
                                       f"(torch 2.5 or newer can)")
    with torch.serialization.safe_globals(NUMPY_CHECKPOINT_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in NUMPY_CHECKPOINT_GLOBALS}
            try:
                unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
            except Exception:
                unsafe = []
            if not unsafe:
                raise _unreadable(path, error) from None
            raise UntrustedCheckpointError(f"{path} holds objects other than weights and numbers "
                                           f"({', '.join(unsafe)}); loading it could run code") from None
        except Exception as error:
            raise _unreadable(path, error) from None


def save_atomically(checkpoint: dict, path: str) -> None:
    """``torch.save`` to ``path + '.tmp'``, then renamed to ``path``; the temporary file is removed if the write
    fails."""
    temporary = f"{path}{TEMPORARY_SUFFIX}"
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_nnunet_checkpoint_with(save_checkpoint: Callable[[object], None], path: str, extra: dict) -> None:
    """nnU-Net's ``save_checkpoint`` (a bound method) serialises its dict into memory; the dict plus ``extra`` is
    written to ``path`` once, atomically. Nothing is written where nnU-Net writes nothing (a rank other than 0,
    checkpointing disabled). Tensors are stored on the CPU (nnU-Net loads them with its own ``map_location``)."""
    buffer = io.BytesIO()
    save_checkpoint(buffer)
    if buffer.getbuffer().nbytes == 0:
        return
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=False)
    save_atomically({**checkpoint, **extra}, path)


def remove_stale_checkpoint_temporaries(folder: str) -> list:
    """Remove ``*.pth.tmp`` files that a process killed during a checkpoint write left behind."""
    stale = glob.glob(os.path.join(glob.escape(folder), f"*.pth{TEMPORARY_SUFFIX}"))
    for path in stale:
        os.remove(path)
    return stale


def incompatibility(checkpoint: dict, plans_name: str, configuration: str, labels: dict) -> str:
    """Why a model checkpoint cannot continue in a trainer of these plans, configuration and labels ('' if it can)."""
    init_args = checkpoint.get('init_args', {})
    theirs = (init_args.get('plans', {}).get('plans_name'), init_args.get('configuration'))
    if theirs != (plans_name, configuration):
        return (f"it was trained with plans '{theirs[0]}', configuration '{theirs[1]}', not '{plans_name}', "
                f"'{configuration}'")
    their_labels = init_args.get('dataset_json', {}).get('labels')
    if their_labels is not None and their_labels != labels:
        return f"its labels {their_labels} differ from this dataset's {labels}"
    return ''
