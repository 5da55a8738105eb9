"""What a BCP (stage 2) training iteration costs next to nnUNetTrainer's, on the same plans and batches.

Usage (nnUNet_* variables set; the dataset planned, preprocessed, with unlabeled images or a label subset):
    python examples/benchmark_cost.py -d DATASET [-c 3d_fullres] [-p nnUNetPlans] [--iterations 20] [--device cpu]

Each trainer runs in its own process (so that peak memory is its own): warm-up iterations, then timed ones.
Prints seconds per iteration, peak memory (RSS on CPU, max allocated on CUDA) and the ratios, plus a breakdown of
the BCP step (teacher forward, pseudo-label filtering, EMA update, mixing) measured on the same batch.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json


def _trainer(kind: str, args):
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2_bcp import nnUNetTrainerBCP
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(args.d))
    plans = load_json(join(folder, args.p + ".json"))
    plans["continue_training"] = False
    cls = nnUNetTrainerBCP if kind == "bcp" else nnUNetTrainer
    fold = args.f if args.f == "all" else int(args.f)
    trainer = cls(plans, args.c, fold, load_json(join(folder, "dataset.json")), torch.device(args.device))
    trainer.initialize()
    return trainer


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(kind: str, args) -> dict:
    """Seconds per iteration and peak memory of one trainer (run inside its own process)."""
    from nnunetv2_bcp.unlabeled.loader import shutdown_stream
    trainer = _trainer(kind, args)
    labeled, validation = trainer.get_dataloaders()
    unlabeled = getattr(trainer, "dataloader_unlabeled", None)
    # the same pre-loaded batches for every iteration: the figure is compute, not data loading
    batch = next(labeled)
    ubatch = next(unlabeled) if unlabeled is not None else None
    for stream in (labeled, validation, unlabeled):
        shutdown_stream(stream)
    if kind == "bcp":
        trainer.current_epoch = trainer.bcp_pretrain_epochs
        trainer.teacher.load_state_dict(trainer.network.state_dict())
        step = lambda: trainer.stage_two_step(batch, ubatch)  # noqa: E731
    else:
        step = lambda: trainer.train_step(batch)  # noqa: E731
    trainer.network.train()
    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(args.device)
    start = time.perf_counter()
    for _ in range(args.iterations):
        step()
    _sync(args.device)
    result = {"seconds_per_iteration": (time.perf_counter() - start) / args.iterations,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "batch_size": trainer.batch_size, "patch_size": list(trainer.configuration_manager.patch_size)}
    if args.device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if kind == "bcp":
        result["breakdown_seconds"] = breakdown(trainer, batch, ubatch, args)
    return result


def breakdown(trainer, batch, ubatch, args) -> dict:
    from nnunetv2_bcp.bcp import ema_update_, keep_largest_component, pseudo_labels
    device = trainer.device
    unlabeled = ubatch["data"].to(device)

    def timed(fn, repeats=5):
        fn()
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(args.device)
        return (time.perf_counter() - start) / repeats

    with torch.no_grad():
        logits = trainer.teacher(unlabeled)
    labels = pseudo_labels(logits, trainer.label_manager.has_regions)
    return {"teacher_forward": timed(lambda: torch.no_grad()(trainer.teacher)(unlabeled)),
            "largest_component": timed(lambda: keep_largest_component(labels, trainer.label_manager.has_regions)),
            "ema_update": timed(lambda: ema_update_(trainer.teacher, trainer.network, 0.99)),
            "whole_step": timed(lambda: trainer.stage_two_step(batch, ubatch), repeats=3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-f", default="0", help="fold (default 0; 'all' for tiny datasets)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["plain", "bcp"], help=argparse.SUPPRESS)
    parser.add_argument("-o", default=None, help="append the result as a JSON line to this file")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    results = {}
    for kind in ("plain", "bcp"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", kind], capture_output=True,
                             text=True, env=dict(os.environ, nnUNet_n_proc_DA="0"))
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, bcp = results["plain"], results["bcp"]
    summary = {"dataset": args.d, "configuration": args.c, "plans": args.p, "device": args.device,
               "batch_size": plain["batch_size"], "patch_size": plain["patch_size"],
               "plain": plain, "bcp": bcp,
               "time_ratio": bcp["seconds_per_iteration"] / plain["seconds_per_iteration"],
               "memory_ratio": bcp.get("peak_cuda_mib", bcp["peak_rss_mib"]) /
               plain.get("peak_cuda_mib", plain["peak_rss_mib"])}
    print(f"{args.d} {args.c} ({args.p}), patch {plain['patch_size']}, batch {plain['batch_size']}, {args.device}")
    memory_key = "peak_cuda_mib" if "peak_cuda_mib" in plain else "peak_rss_mib"
    for kind in ("plain", "bcp"):
        r = results[kind]
        print(f"  {kind:5s}: {r['seconds_per_iteration']:.3f} s/iteration, peak memory {r[memory_key]:.0f} MiB "
              f"({memory_key})")
    print(f"  ratio BCP/plain: time {summary['time_ratio']:.3f}x, memory {summary['memory_ratio']:.3f}x")
    print("  BCP step breakdown [s]: " + ", ".join(f"{k} {v:.3f}" for k, v in bcp["breakdown_seconds"].items()))
    if args.o:
        os.makedirs(os.path.dirname(os.path.abspath(args.o)), exist_ok=True)
        with open(args.o, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
