"""``nnUNetv2_bcp_demo``: labeled-only nnU-Net vs BCP on the same few labels, end to end with nnU-Net's commands.

Builds a dataset (synthetic by default, or from an MSD-style folder) with few labeled, many unlabeled and a
labeled test set, runs nnU-Net's planning and preprocessing, trains ``nnUNetTrainerDemo`` (labeled cases only)
and ``nnUNetTrainerBCPDemo`` (labeled + unlabeled) with the same short schedule, predicts the test set with
``nnUNetv2_predict`` and prints the Dice per class of both.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, load_json, maybe_mkdir_p, save_json, subfiles

import nnunetv2_bcp
from nnunetv2_bcp.demo.synthetic import make_synthetic_dataset


# What the demo (and the examples' benchmarks) set for the nnU-Net commands they start, unless the user has: few
# workers and no torch.compile on a small machine; and glibc keeps the large blocks a training step frees in its heap.
# By default it gives them back to the OS and the next step faults them in again page by page, which on a 2-core CPU
# costs a BCP step much of its time (docs/benchmarks.md). On a GPU the step's tensors are not glibc's.
SMALL_MACHINE_ENVIRONMENT = {"nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2", "nnUNet_compile": "f",
                             "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def _run(cmd, env):
    print(f"\n$ {' '.join(cmd)}", flush=True)
    exe = join(os.path.dirname(sys.executable), cmd[0])
    subprocess.run([exe if os.path.isfile(exe) else cmd[0], *cmd[1:]], env=env, check=True)


def prepare_msd_dataset(msd_folder: str, raw_root: str, dataset_id: int, num_labeled: int, num_test: int,
                        seed: int, env: dict) -> str:
    """Convert an MSD task with nnU-Net's converter, then keep ``num_labeled`` labeled training cases, set
    ``num_test`` labeled cases aside as the test set and move the rest to imagesUnlabeled (labels dropped)."""
    _run(["nnUNetv2_convert_MSD_dataset", "-i", msd_folder, "-overwrite_id", str(dataset_id)], env)
    folder = [join(raw_root, d) for d in os.listdir(raw_root) if d.startswith(f"Dataset{dataset_id:03d}_")][0]
    dataset_json = load_json(join(folder, "dataset.json"))
    ending = dataset_json["file_ending"]
    cases = sorted(f[:-len(ending)] for f in os.listdir(join(folder, "labelsTr")) if f.endswith(ending))
    if num_labeled + num_test >= len(cases):
        raise SystemExit(f"{msd_folder} has {len(cases)} labeled cases: too few for {num_labeled} labeled + "
                         f"{num_test} test + at least one unlabeled")
    order = np.random.default_rng(seed).permutation(cases)
    test, labeled, unlabeled = order[:num_test], order[num_test:num_test + num_labeled], order[num_test + num_labeled:]
    for sub in ("imagesTs", "labelsTs", "imagesUnlabeled"):
        maybe_mkdir_p(join(folder, sub))
    for f in subfiles(join(folder, "imagesTs"), join=False):  # MSD's own unlabeled test images stay out of it
        os.remove(join(folder, "imagesTs", f))
    for group, target in ((test, "imagesTs"), (unlabeled, "imagesUnlabeled")):
        for case in group:
            for image in subfiles(join(folder, "imagesTr"), prefix=case + "_", suffix=ending, join=False):
                shutil.move(join(folder, "imagesTr", image), join(folder, target, image))
            label = join(folder, "labelsTr", case + ending)
            if target == "imagesTs":
                shutil.move(label, join(folder, "labelsTs", case + ending))
            else:
                os.remove(label)  # unlabeled: its label must not exist for the demo
    dataset_json["numTraining"] = len(labeled)
    save_json(dataset_json, join(folder, "dataset.json"), sort_keys=False)
    print(f"{len(labeled)} labeled, {len(unlabeled)} unlabeled, {len(test)} test cases", flush=True)
    return folder


def dice_per_class(pred_folder: str, ref_folder: str, labels: dict) -> dict:
    """Mean Dice per class over the test cases, from nnU-Net's own evaluation (written to ``summary.json`` in
    ``pred_folder``): a case where a class is absent from both maps does not count, as in nnU-Net's reports."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple, load_summary_json
    classes = {name: value for name, value in labels.items() if value != 0}
    summary = join(pred_folder, "summary.json")
    compute_metrics_on_folder_simple(ref_folder, pred_folder, list(classes.values()), summary, num_processes=1)
    means = load_summary_json(summary)["mean"]
    return {name: float(means[value]["Dice"]) for name, value in classes.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--work-dir", default="bcp_demo", help="work folder (default ./bcp_demo); holds "
                        "nnUNet_raw, nnUNet_preprocessed and nnUNet_results of the demo")
    parser.add_argument("--msd", default=None, help="an MSD-style task folder (e.g. ../shared/data/"
                        "Task04_Hippocampus) instead of the synthetic data")
    parser.add_argument("--num-labeled", type=int, default=4, help="labeled training cases (default 4)")
    parser.add_argument("--num-unlabeled", type=int, default=16, help="unlabeled cases (synthetic data only)")
    parser.add_argument("--num-test", type=int, default=8, help="labeled test cases (default 8)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of both trainings (default 12)")
    parser.add_argument("--iterations", type=int, default=20, help="iterations per epoch (default 20)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.time()
    work = os.path.abspath(args.work_dir)
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = join(work, name)
        maybe_mkdir_p(env[name])
    env["nnUNet_extTrainer"] = os.pathsep.join(  # the user's own trainer folders stay searchable
        filter(None, [nnunetv2_bcp.ext_trainer_dir(), os.environ.get("nnUNet_extTrainer")]))
    for name, value in SMALL_MACHINE_ENVIRONMENT.items():
        env.setdefault(name, value)
    env["BCP_DEMO_EPOCHS"], env["BCP_DEMO_ITERATIONS"] = str(args.epochs), str(args.iterations)
    dataset_id = 502 if args.msd else 501
    for d in os.listdir(env["nnUNet_raw"]):  # a fresh start for this dataset id
        if d.startswith(f"Dataset{dataset_id:03d}_"):
            for root in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
                shutil.rmtree(join(env[root], d), ignore_errors=True)

    if args.msd:
        folder = prepare_msd_dataset(os.path.abspath(args.msd), env["nnUNet_raw"], dataset_id, args.num_labeled,
                                     args.num_test, args.seed, env)
    else:
        print(f"Building a synthetic dataset: {args.num_labeled} labeled, {args.num_unlabeled} unlabeled, "
              f"{args.num_test} test cases (32x32x32)", flush=True)
        folder = make_synthetic_dataset(env["nnUNet_raw"], dataset_id, "BCPDemo", args.num_labeled,
                                        args.num_unlabeled, args.num_test, seed=args.seed)
    dataset_json = load_json(join(folder, "dataset.json"))
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "2"], env)

    results = {}
    for trainer in ("nnUNetTrainerDemo", "nnUNetTrainerBCPDemo"):
        t0 = time.time()
        _run(["nnUNetv2_train", str(dataset_id), "3d_fullres", "all", "-tr", trainer, "-device", args.device], env)
        pred = join(work, f"predictions_{trainer}")
        _run(["nnUNetv2_predict", "-i", join(folder, "imagesTs"), "-o", pred, "-d", str(dataset_id), "-c",
              "3d_fullres", "-f", "all", "-tr", trainer, "-device", args.device, "-npp", "1", "-nps", "1"], env)
        results[trainer] = (dice_per_class(pred, join(folder, "labelsTs"), dataset_json["labels"]), time.time() - t0)

    names = [n for n, v in dataset_json["labels"].items() if v != 0]
    lines = [f"\nDice on {args.num_test} held-out test cases ({args.num_labeled} labeled training cases, "
             f"{args.epochs} epochs x {args.iterations} iterations, 3d_fullres):",
             f"{'trainer':<24}" + "".join(f"{n:>12}" for n in names) + f"{'mean':>10}{'time [s]':>10}"]
    for trainer, (scores, seconds) in results.items():
        lines.append(f"{trainer:<24}" + "".join(f"{scores[n]:>12.4f}" for n in names)
                     + f"{np.mean(list(scores.values())):>10.4f}{seconds:>10.0f}")
    lines.append(f"total {time.time() - start:.0f} s; models in {env['nnUNet_results']}")
    print("\n".join(lines), flush=True)
    save_json({t: {"dice": s, "seconds": sec} for t, (s, sec) in results.items()}, join(work, "demo_results.json"))


if __name__ == "__main__":
    main()
