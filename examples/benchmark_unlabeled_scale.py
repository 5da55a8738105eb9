"""The unlabeled side at scale: preprocessing many small unlabeled images, and the stream over all of them.

Usage (makes its own synthetic dataset in a scratch folder; nnUNet_* variables are set for it):
    python examples/benchmark_unlabeled_scale.py [--cases 1000] [--shape 32 32 32] [--np 1 2] [--batches 50]

Prints, for ``nnUNetv2_bcp_preprocess_unlabeled -np N``: cases/s, peak memory of the process and its workers
together (proportional set sizes summed, sampled every 0.05 s), disk used by the preprocessed cases; then the start-up
check a training does when everything is up to date, and patches/s of the BCP trainer's unlabeled stream over
all the cases (with ``nnUNet_n_proc_DA`` from the environment, as training would use it).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time


def _children(pid: int) -> list:
    """Every descendant process of ``pid`` (from /proc, Linux)."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent_of[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parent_of.items() if parent in frontier]
        found += frontier
    return found


def _pss_bytes(pid: int) -> int:
    """Proportional set size: pages shared between processes (forks, libraries) are split among them, so the sum
    over processes is the memory they use together (summed RSS would count a fork's shared pages twice)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def run_with_peak_memory(cmd, env) -> tuple:
    """(seconds, peak memory in bytes of the command and all its descendants together)."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], sum(_pss_bytes(p) for p in [process.pid, *_children(process.pid)]))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return seconds, peak[0]


def disk_bytes(folder: str) -> int:
    return sum(os.stat(os.path.join(folder, f)).st_blocks * 512 for f in os.listdir(folder))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 32, 32])
    parser.add_argument("--np", type=int, nargs="+", default=[1, 2], help="worker counts to preprocess with")
    parser.add_argument("--batches", type=int, default=50, help="stream batches timed (after one warm-up batch)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder)")
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="bcp_unlabeled_scale_")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = os.path.join(workdir, name)
        os.makedirs(os.environ[name], exist_ok=True)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_compile", "f")
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2_bcp import nnUNetTrainerBCP
    from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset
    from nnunetv2_bcp.unlabeled.loader import shutdown_stream

    dataset_id, name = 997, "UnlabeledScale"
    start = time.perf_counter()
    raw = make_synthetic_dataset(os.environ["nnUNet_raw"], dataset_id, name, num_labeled=6,
                                 num_unlabeled=args.cases, num_test=0, shape=args.shape)
    print(f"{args.cases} synthetic unlabeled images of {args.shape} written in {time.perf_counter() - start:.0f} s "
          f"({disk_bytes(join(raw, 'imagesUnlabeled')) / 2 ** 20:.1f} MiB of .nii.gz) under {workdir}", flush=True)
    subprocess.run([join(bindir, "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
                    "-np", "1"], env=env, check=True, stdout=subprocess.DEVNULL)
    preprocessed = join(os.environ["nnUNet_preprocessed"], os.path.basename(raw))
    folder = join(preprocessed, "nnUNetPlans_3d_fullres_unlabeled")

    print(f"\npreprocessing {args.cases} unlabeled cases (nnUNetv2_bcp_preprocess_unlabeled, 3d_fullres)")
    print("| -np | seconds | cases/s | peak memory (all processes) | disk used |")
    print("|---|---|---|---|---|")
    for workers in args.np:
        subprocess.run(["rm", "-rf", folder], check=True)
        seconds, peak = run_with_peak_memory([join(bindir, "nnUNetv2_bcp_preprocess_unlabeled"), "-d",
                                              str(dataset_id), "-c", "3d_fullres", "-np", str(workers)], env)
        print(f"| {workers} | {seconds:.0f} | {args.cases / seconds:.1f} | {peak / 2 ** 20:.0f} MiB | "
              f"{disk_bytes(folder) / 2 ** 20:.1f} MiB |", flush=True)

    plans = dict(load_json(join(preprocessed, "nnUNetPlans.json")), continue_training=False)
    trainer = nnUNetTrainerBCP(plans, "3d_fullres", 0, load_json(join(preprocessed, "dataset.json")),
                               torch.device("cpu"))
    trainer.initialize()
    start = time.perf_counter()
    folder_again, keys, _ = trainer._unlabeled_keys()  # every case up to date: validation + staleness check only
    check = time.perf_counter() - start
    print(f"\ntraining start-up with {len(keys)} up-to-date unlabeled cases (raw images validated, staleness "
          f"checked): {check:.1f} s")
    labeled, validation = trainer.get_dataloaders()
    stream = trainer.dataloader_unlabeled
    try:
        next(stream)  # warm-up: workers started, caches filled
        seen = set()
        start = time.perf_counter()
        for _ in range(args.batches):
            seen.update(next(stream)["keys"])
        seconds = time.perf_counter() - start
        workers = getattr(stream, "num_processes", 0)
        print(f"unlabeled stream over {len(keys)} cases: {args.batches * trainer.batch_size / seconds:.1f} "
              f"patches/s (batch {trainer.batch_size}, patch {trainer.configuration_manager.patch_size}, "
              f"{workers} augmentation worker(s), {len(seen)} distinct cases in {args.batches} batches)")
    finally:
        for s in (stream, labeled, validation):
            shutdown_stream(s)


if __name__ == "__main__":
    main()
