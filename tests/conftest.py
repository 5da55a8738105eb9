"""Test set-up: nnU-Net's folders point into a temporary directory BEFORE nnunetv2 is imported (nnunetv2.paths
reads them at import time), and helpers to build, plan and preprocess synthetic datasets."""
import os
import subprocess
import sys
import tempfile

_ROOT = tempfile.mkdtemp(prefix="nnunetv2_bcp_tests_")
for _name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ[_name] = os.path.join(_ROOT, _name)
    os.makedirs(os.environ[_name], exist_ok=True)
os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_compile", "f")

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist: the workers share the machine's cores (each worker has its own nnU-Net folders, _ROOT above)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy(rank): a long run through nnU-Net's commands, started before the other "
                                       "tests in the order of its rank; pytest-xdist (--maxschedchunk 1) queues two "
                                       "tests per worker, so ranks 1 and 2 run on one worker, 3 and 4 on the other")


def pytest_collection_modifyitems(items):
    def start_order(item):
        heavy = item.get_closest_marker("heavy")
        return (0, heavy.args[0] if heavy.args else 0) if heavy else (1, 0)
    items.sort(key=start_order)  # stable: otherwise in file order


def foreground_dice(prediction, reference) -> float:
    """Dice of the foreground (every label above 0) of two label maps; 0 where both are empty."""
    a, b = prediction > 0, reference > 0
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def run_cli(*args, check=True, env=None, timeout=900):
    """Run a console command (nnU-Net's or ours) in a subprocess; return the CompletedProcess. nnU-Net's validation
    export gets one worker unless ``env`` says otherwise: each worker is a spawned process that imports nnU-Net."""
    full_env = {**os.environ, "nnUNet_def_n_proc": "1", **(env or {})}
    bindir = os.path.dirname(sys.executable)
    cmd = [os.path.join(bindir, args[0]) if os.path.isfile(os.path.join(bindir, args[0])) else args[0], *args[1:]]
    result = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def plan_and_preprocess(dataset_id, configurations=("3d_fullres",), gpu_memory_target=None, plans_name=None):
    """What ``nnUNetv2_plan_and_preprocess -d ID -c CONFIGURATIONS -npfp 1 -np 1 [-gpu_memory_target G]
    [-overwrite_plans_name P]`` does, through the same nnU-Net functions, in this process: one worker per pool (the
    command's default is 8 fingerprint workers, each a spawned process that imports nnU-Net)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    extract_fingerprints([dataset_id], num_processes=1, verbose=False, show_progress_bar=False)
    plans_identifier = plan_experiments([dataset_id], gpu_memory_target_in_gb=gpu_memory_target,
                                        overwrite_plans_name=plans_name)
    preprocess([dataset_id], plans_identifier, list(configurations), [1] * len(configurations),
               show_progress_bar=False)


@pytest.fixture(scope="session")
def nnunet_dirs():
    return {k: os.environ[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


@pytest.fixture(scope="session")
def synthetic_3d(nnunet_dirs):
    """Dataset990: 6 labeled + 4 unlabeled 32^3 cases, planned and preprocessed for 3d_fullres."""
    from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset
    folder = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], 990, "BCPSynthetic", num_labeled=6,
                                    num_unlabeled=4, num_test=2, shape=(32, 32, 32))
    plan_and_preprocess(990)
    return {"id": 990, "raw": folder,
            "preprocessed": os.path.join(nnunet_dirs["nnUNet_preprocessed"], os.path.basename(folder))}
