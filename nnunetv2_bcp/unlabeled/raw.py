"""The raw layout of unlabeled images: ``nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/{case}_{channel:04d}{ending}``.

Everything here runs before any long computation and fails with a message that names the file and the problem.
"""
import gzip
import os
import re
from typing import Dict, List, Optional, Sequence

import numpy as np

UNLABELED_FOLDER = "imagesUnlabeled"
MAX_LISTED_PROBLEMS = 20


class UnlabeledDataError(ValueError):
    """A problem with the user's unlabeled data (or label subset) that must be fixed before training."""


def raise_problems(problems: Sequence[str], what: str) -> None:
    """Raise one :class:`UnlabeledDataError` listing every problem (the first ``MAX_LISTED_PROBLEMS``)."""
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise UnlabeledDataError(f"{what}:\n  {listed}{more}")


def num_channels(dataset_json: dict) -> int:
    return len(dataset_json["channel_names"] if "channel_names" in dataset_json else dataset_json["modality"])


def find_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """Map case identifier -> channel files (sorted by channel) of ``imagesUnlabeled``; {} if the folder is absent.

    Checks the names only: file ending, ``_XXXX`` channel suffix, every channel of dataset.json present and no
    other channel.
    """
    folder = os.path.join(raw_dataset_folder, UNLABELED_FOLDER)
    if not os.path.isdir(folder):
        return {}
    ending = dataset_json["file_ending"]
    channels = num_channels(dataset_json)
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    problems, found = [], {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or os.path.isdir(path):
            continue
        if not name.endswith(ending):
            problems.append(f"{path}: wrong file ending; dataset.json declares file_ending '{ending}'")
            continue
        match = pattern.match(name)
        if match is None:
            problems.append(f"{path}: name must be CASE_XXXX{ending} with a 4-digit channel index, like imagesTr")
            continue
        found.setdefault(match["case"], {})[int(match["channel"])] = path
    cases = {}
    for case, files in found.items():
        missing = [c for c in range(channels) if c not in files]
        extra = sorted(c for c in files if c >= channels)
        if missing:
            problems.append(f"{os.path.join(folder, f'{case}_{missing[0]:04d}{ending}')}: missing; dataset.json "
                            f"declares {channels} channel(s), case '{case}' has channel(s) {sorted(files)}")
        if extra:
            problems.append(f"{files[extra[0]]}: channel {extra[0]} but dataset.json declares only {channels} "
                            f"channel(s) (0..{channels - 1})")
        cases[case] = [files[c] for c in range(channels) if c in files]
    raise_problems(problems, f"Unlabeled images in {folder} do not follow nnU-Net's imagesTr naming")
    return cases


def _image_header(path: str) -> dict:
    import SimpleITK as sitk  # here, not at import: training from preprocessed data needs no image reader
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    size = reader.GetSize()
    return {"ndim": reader.GetDimension(), "size": size, "spacing": reader.GetSpacing(),
            "origin": reader.GetOrigin(), "direction": reader.GetDirection(),
            "components": reader.GetNumberOfComponents()}


def _geometry_problem(reference: dict, other: dict) -> Optional[str]:
    if reference["size"] != other["size"]:
        return f"size {other['size']} differs from channel 0's {reference['size']}"
    for key in ("spacing", "origin", "direction"):
        if not np.allclose(reference[key], other[key], rtol=1e-4, atol=1e-4):
            return (f"{key} {tuple(np.round(other[key], 4))} differs from channel 0's "
                    f"{tuple(np.round(reference[key], 4))}")
    return None


SITK_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")


def _sitk_can_read(path: str) -> bool:
    """Whether the header can be checked with SimpleITK (formats nnU-Net reads with SimpleITKIO/NibabelIO)."""
    return path.lower().endswith(SITK_FILE_ENDINGS)


def check_unlabeled_images(cases: Dict[str, List[str]], expected_ndim: Optional[int]) -> None:
    """Read the header of every file: readable, same dimensionality as the training images, same geometry across
    the channels of a case. Formats SimpleITK cannot read (e.g. nnU-Net's .png/.tif readers) are checked when
    they are preprocessed, where errors also name the file."""
    problems = []
    for case, files in cases.items():
        headers = []
        for path in files:
            if not _sitk_can_read(path):
                headers.append(None)
                continue
            try:
                headers.append(_image_header(path))
            except RuntimeError as e:
                problems.append(f"{path}: unreadable image ({str(e).strip().splitlines()[-1][:200]})")
                headers.append(None)
                continue
            ndim = headers[-1]["ndim"]
            if expected_ndim is not None and ndim != expected_ndim:
                problems.append(f"{path}: {ndim}D image, but the training images (imagesTr) are {expected_ndim}D")
        if headers and headers[0] is not None:
            for path, header in zip(files[1:], headers[1:]):
                if header is not None and header["ndim"] == headers[0]["ndim"]:
                    problem = _geometry_problem(headers[0], header)
                    if problem:
                        problems.append(f"{path}: {problem} (all channels of case '{case}' must share one geometry)")
    raise_problems(problems, "Unlabeled images cannot be used")


def check_image_file(path: str) -> None:
    """Read the voxels of ``path`` independently of nnU-Net's reader and raise :class:`UnlabeledDataError` if the
    file is truncated/corrupt or holds NaN/infinite values.

    Needed because SimpleITK reads a truncated ``.nii.gz`` without complaint (missing voxels become 0) and turns
    NaN into 0 on reading. NIfTI files are read with nibabel; other gzip files get a stream check.
    """
    try:
        if path.endswith((".nii", ".nii.gz")):
            import nibabel
            voxels = np.asanyarray(nibabel.load(path).dataobj)
            if np.issubdtype(voxels.dtype, np.floating) and not np.all(np.isfinite(voxels)):
                raise UnlabeledDataError(f"{path}: contains NaN or infinite voxels")
        elif path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    except UnlabeledDataError:
        raise
    except Exception as e:
        raise UnlabeledDataError(f"{path}: truncated or corrupt file ({type(e).__name__}: {e})") from e


def training_image_ndim(training_cases: Dict[str, dict]) -> Optional[int]:
    """Dimensionality of the first training image (from its header), or None if it cannot be read by SimpleITK."""
    for case in training_cases.values():
        path = case["images"][0]
        if _sitk_can_read(path):
            try:
                return _image_header(path)["ndim"]
            except RuntimeError:
                return None
        return None
    return None
