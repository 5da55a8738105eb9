"""What a BCP (stage 2) training iteration costs next to nnUNetTrainer's, on the same plans and batches.

Usage (nnUNet_* variables set; the dataset planned, preprocessed, with unlabeled images or a label subset):
    python examples/benchmark_cost.py -d DATASET [-c 3d_fullres] [-p nnUNetPlans] [--iterations 20] [--device cpu]
        [--repeats 2] [--data-wait-iterations N] [--filter-shape 128 128 128] [--bcp NAME=VALUE ...]

Each trainer runs in its own process (so that peak memory is its own): warm-up iterations, then timed ones; with
``--repeats R`` each trainer runs R times in alternating order and the figure is the median over all its timed
iterations (a 2-core machine's speed drifts by several percent between runs); peak memory is the largest of the runs,
the breakdown and data-wait figures are the last run's. Prints seconds per iteration, peak memory (RSS on CPU, max
allocated on CUDA) and the ratios, plus a breakdown of the BCP step (teacher forward, pseudo-label filtering and its
share of the step, EMA update) measured on the same batch. ``--data-wait-iterations N`` then runs N iterations on the
real streams (nnU-Net's augmentation workers, ``nnUNet_n_proc_DA``) and reports the seconds per iteration spent waiting
for batches; ``--filter-shape`` times the largest-component filter on a synthetic batch of two label maps of that shape
as well. Each trainer also counts the operators one step dispatches (forward, backward, optimizer; on a GPU each is
about one kernel launch, which bounds a short step) and the files they come from. The BCP trainer has the plugin's
defaults; ``--bcp`` sets BCP settings on it before it is initialised (e.g. ``bcp_labeled_loss_weight=0``: the
paper's loss alone, without the default supervised term). ``nnUNet_compile=t`` on CUDA times both trainers compiled
as nnU-Net compiles them by default there (student and teacher; the warm-up iterations compile, and no operators are
counted: the compiled graphs dispatch fused kernels the count cannot see).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json

from nnunetv2_bcp.bcp import is_compiled
from nnunetv2_bcp.training.nnUNetTrainerBCP import STAGE_TWO_SETTINGS


def trainer_class(kind: str, preprocessed_folder: str):
    """nnU-Net's trainer ("plain"), or BCP with the plugin's defaults ("bcp"): on the dataset's label subset where it
    has one (the device check's data), else on every label with its imagesUnlabeled."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP
    from nnunetv2_bcp.training.variant_label_subset import nnUNetTrainerBCP_labelSubset
    from nnunetv2_bcp.unlabeled.label_subset import label_subset_path
    if kind != "bcp":
        return nnUNetTrainer
    return nnUNetTrainerBCP_labelSubset if isfile(label_subset_path(preprocessed_folder)) else nnUNetTrainerBCP


def _trainer(kind: str, args):
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(args.d))
    plans = load_json(join(folder, args.p + ".json"))
    plans["continue_training"] = False
    cls = trainer_class(kind, folder)
    fold = args.f if args.f == "all" else int(args.f)
    trainer = cls(plans, args.c, fold, load_json(join(folder, "dataset.json")), torch.device(args.device))
    if kind == "bcp":
        from benchmark_label_scarce import parse_settings
        for name, value in parse_settings(args.bcp).items():
            if not hasattr(trainer, name):
                raise SystemExit(f"--bcp {name}: nnUNetTrainerBCP has no such setting")
            setattr(trainer, name, value)
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
    if kind == "bcp":
        trainer.current_epoch = trainer.pretrain_epochs()
        trainer.begin_stage_two()
        step_on = trainer.stage_two_step
    else:
        step_on = lambda b, _: trainer.train_step(b)  # noqa: E731
    step = lambda: step_on(batch, ubatch)  # noqa: E731
    trainer.network.train()
    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(args.device)
    seconds = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        step()
        _sync(args.device)
        seconds.append(time.perf_counter() - start)
    result = {"seconds_per_iteration": float(np.median(seconds)), "iteration_seconds": seconds,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "batch_size": trainer.batch_size, "patch_size": list(trainer.configuration_manager.patch_size),
              "compiled": is_compiled(trainer.network)}
    if args.device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if kind == "bcp":
        # what the step was, whatever the plugin's defaults are when it is read (an empty entry: the paper's loss)
        result["stage_two"] = {name: getattr(trainer, name) for name in STAGE_TWO_SETTINGS}
        result["breakdown_seconds"] = breakdown(trainer, batch, ubatch, args)
        if args.filter_shape:
            result["largest_component_seconds_2x" + "x".join(map(str, args.filter_shape))] = \
                synthetic_filter_seconds(args.filter_shape, trainer.device, args)
    if not result["compiled"]:
        result["dispatched_operators"] = dispatched_operators(step)
    if args.data_wait_iterations:
        result["data_wait_seconds_per_iteration"] = data_wait(step_on, labeled, unlabeled, args)
    for stream in (labeled, validation, unlabeled):
        shutdown_stream(stream)
    return result


OPERATOR_SOURCES = ("nnunetv2_bcp", "nnunetv2", "dynamic_network_architectures", "torch/optim", "torch/autograd")


def dispatched_operators(step) -> dict:
    """The ATen operators one call of ``step`` dispatches: the total, and per source file (the innermost frame of
    the plugin, nnU-Net, the network, torch's optimizers or autograd; backward passes run by the autograd engine on
    another thread are counted only where the engine runs them on this one, as on the CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    by_source = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            frame, source = sys._getframe(1), "other"
            while frame is not None:
                path = frame.f_code.co_filename.replace(os.sep, "/")
                known = next((s for s in OPERATOR_SOURCES if f"/{s}/" in path), None)
                if known:
                    source = known if known.startswith("torch/") else path[path.rindex(f"/{known}/") + 1:]
                    break
                frame = frame.f_back
            by_source[source] = by_source.get(source, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return {"total": sum(by_source.values()), "by_source": dict(sorted(by_source.items(), key=lambda kv: -kv[1]))}


def data_wait(step_on, labeled, unlabeled, args) -> float:
    """Seconds per iteration spent in ``next()`` of the streams while training on their batches."""
    waited = 0.0
    for _ in range(args.data_wait_iterations):
        start = time.perf_counter()
        batch = next(labeled)
        ubatch = next(unlabeled) if unlabeled is not None else None
        waited += time.perf_counter() - start
        step_on(batch, ubatch)
    _sync(args.device)
    return waited / args.data_wait_iterations


def synthetic_filter_seconds(shape, device, args) -> float:
    """The largest-component filter on two smooth random 3-class label maps of ``shape`` (many components)."""
    from nnunetv2_bcp.bcp import keep_largest_component
    noise = torch.nn.functional.avg_pool3d(torch.randn(2, 1, *shape, device=device), 5, stride=1, padding=2)
    labels = torch.bucketize(noise, torch.tensor([0.1, 0.2], device=device)).to(torch.int16)
    keep_largest_component(labels)
    _sync(args.device)
    start = time.perf_counter()
    for _ in range(5):
        keep_largest_component(labels)
    _sync(args.device)
    return (time.perf_counter() - start) / 5


def breakdown(trainer, batch, ubatch, args) -> dict:
    from nnunetv2_bcp.bcp import ema_update_, keep_largest_component, pseudo_labels
    device = trainer.device
    unlabeled = ubatch["data"].to(device)
    if trainer.bcp_teacher_weak_view:  # the stream carries both views; the teacher sees the weak one
        from nnunetv2_bcp.unlabeled.weak_view import split_views
        unlabeled = split_views(unlabeled)[1]

    def timed(fn, repeats=5):
        fn()
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(args.device)
        return (time.perf_counter() - start) / repeats

    @torch.no_grad()
    def teacher_forward():  # as the step runs it: compiled where the student is, autocast on CUDA
        with trainer._autocast():
            return trainer.teacher_forward(unlabeled)

    labels = pseudo_labels(teacher_forward().float(), trainer.label_manager.has_regions)
    seconds = {"teacher_forward": timed(teacher_forward),
               "largest_component": timed(lambda: keep_largest_component(labels, trainer.label_manager.has_regions)),
               "ema_update": timed(lambda: ema_update_(trainer.teacher, trainer.network, 0.99)),
               "whole_step": timed(lambda: trainer.stage_two_step(batch, ubatch), repeats=3)}
    seconds["largest_component_share"] = seconds["largest_component"] / seconds["whole_step"]
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-f", default="0", help="fold (default 0; 'all' for tiny datasets)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2,
                        help="processes per trainer, run in alternating order (default 2); the figure is the median "
                             "over all their timed iterations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-wait-iterations", type=int, default=0,
                        help="then N iterations on the real streams, timing the waits for batches (0: skip)")
    parser.add_argument("--filter-shape", type=int, nargs="+", default=None,
                        help="also time the largest-component filter on 2 synthetic label maps of this shape")
    parser.add_argument("--bcp", nargs="+", default=[], metavar="NAME=VALUE",
                        help="BCP settings for the BCP trainer, e.g. bcp_labeled_loss_weight=0 (values are JSON)")
    parser.add_argument("--only", choices=["plain", "bcp"], help=argparse.SUPPRESS)
    parser.add_argument("-o", default=None, help="append the result as a JSON line to this file")
    args = parser.parse_args()
    from benchmark_label_scarce import parse_settings
    settings = parse_settings(args.bcp)  # a malformed setting is refused before anything runs
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    results = {}
    # without the data-wait run the streams only deliver the first batch: no augmentation workers
    env = dict(os.environ) if args.data_wait_iterations else dict(os.environ, nnUNet_n_proc_DA="0")
    runs = {"plain": [], "bcp": []}
    for repeat in range(args.repeats):
        # alternating order, so that a slow phase of the machine does not fall on one trainer only
        for kind in ("plain", "bcp") if repeat % 2 == 0 else ("bcp", "plain"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", kind], capture_output=True,
                                 text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for kind, measured in runs.items():
        pooled = [s for r in measured for s in r.pop("iteration_seconds")]
        results[kind] = {**measured[-1], "seconds_per_iteration": float(np.median(pooled)),
                         "seconds_per_iteration_per_run": [r["seconds_per_iteration"] for r in measured],
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in measured)}
        if "peak_cuda_mib" in measured[-1]:
            results[kind]["peak_cuda_mib"] = max(r["peak_cuda_mib"] for r in measured)
    plain, bcp = results["plain"], results["bcp"]
    summary = {"dataset": args.d, "configuration": args.c, "plans": args.p, "device": args.device,
               "bcp_settings": settings, "bcp_stage_two": bcp["stage_two"],
               # glibc's allocator settings change a CPU step's time (docs/benchmarks.md)
               "malloc_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
               "batch_size": plain["batch_size"], "patch_size": plain["patch_size"], "compiled": plain["compiled"],
               "plain": plain, "bcp": bcp,
               "time_ratio": bcp["seconds_per_iteration"] / plain["seconds_per_iteration"],
               "memory_ratio": bcp.get("peak_cuda_mib", bcp["peak_rss_mib"]) /
               plain.get("peak_cuda_mib", plain["peak_rss_mib"])}
    print(f"{args.d} {args.c} ({args.p}), patch {plain['patch_size']}, batch {plain['batch_size']}, {args.device}"
          + (", compiled" if plain["compiled"] else ""))
    memory_key = "peak_cuda_mib" if "peak_cuda_mib" in plain else "peak_rss_mib"
    for kind in ("plain", "bcp"):
        r = results[kind]
        print(f"  {kind:5s}: {r['seconds_per_iteration']:.3f} s/iteration, peak memory {r[memory_key]:.0f} MiB "
              f"({memory_key})")
    print(f"  ratio BCP/plain: time {summary['time_ratio']:.3f}x, memory {summary['memory_ratio']:.3f}x")
    print("  BCP step breakdown [s]: " + ", ".join(f"{k} {v:.3f}" for k, v in bcp["breakdown_seconds"].items()))
    for key in sorted(k for k in bcp if k.startswith("largest_component_seconds")):
        print(f"  {key}: {bcp[key]:.4f}")
    if "dispatched_operators" in plain:
        plain_ops, bcp_ops = plain["dispatched_operators"], bcp["dispatched_operators"]
        print(f"  operators dispatched per step: plain {plain_ops['total']}, bcp {bcp_ops['total']} "
              f"({bcp_ops['total'] / plain_ops['total']:.2f}x); BCP's by source: "
              + ", ".join(f"{k} {v}" for k, v in list(bcp_ops["by_source"].items())[:8]))
    if args.data_wait_iterations:
        print("  waiting for data [s/iteration]: " + ", ".join(
            f"{kind} {results[kind]['data_wait_seconds_per_iteration']:.4f}" for kind in ("plain", "bcp")))
    if args.o:
        os.makedirs(os.path.dirname(os.path.abspath(args.o)), exist_ok=True)
        with open(args.o, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
