"""Throughput of the unlabeled stream next to nnU-Net's labeled loader, and what a BCP training step consumes.

Usage (nnUNet_raw/preprocessed/results set, dataset planned and preprocessed, unlabeled images in place):
    python examples/benchmark_stream.py -d DATASET [-c 3d_fullres] [--batches 40] [--steps 5]

Prints patches/s of each stream (with the augmentation workers the trainer gives it: nnU-Net's ``nnUNet_n_proc_DA``
for the labeled loader, half of it for the unlabeled stream; each stream is timed alone) and the patches/s a stage-2
step consumes from each stream on this machine's device, i.e. whether the streams keep up.
"""
import argparse
import time

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json


def patches_per_second(stream, batch_size: int, batches: int) -> float:
    next(stream)  # warm-up: workers started, caches filled
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - start)


def main():
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2_bcp import nnUNetTrainerBCP
    from nnunetv2_bcp.unlabeled.loader import shutdown_stream

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-f", default="0")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=5, help="stage-2 steps timed (after one warm-up step)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(args.d))
    plans = load_json(join(folder, args.p + ".json"))
    plans["continue_training"] = False
    fold = args.f if args.f == "all" else int(args.f)
    trainer = nnUNetTrainerBCP(plans, args.c, fold, load_json(join(folder, "dataset.json")), torch.device(args.device))
    trainer.initialize()
    labeled, validation = trainer.get_dataloaders()
    unlabeled = trainer.dataloader_unlabeled
    try:
        bs = trainer.batch_size
        lab = patches_per_second(labeled, bs, args.batches)
        unl = patches_per_second(unlabeled, bs, args.batches)
        trainer.current_epoch = trainer.pretrain_epochs()
        trainer.teacher.load_state_dict(trainer.network.state_dict())
        trainer.stage_two_step(next(labeled), next(unlabeled))
        start = time.perf_counter()
        for _ in range(args.steps):
            batch, ubatch = next(labeled), next(unlabeled)
            trainer.stage_two_step(batch, ubatch)
        step = (time.perf_counter() - start) / args.steps
        print(f"dataset {args.d} {args.c}: patch {trainer.configuration_manager.patch_size}, batch {bs}, "
              f"device {args.device}")
        workers = lambda stream: getattr(stream, "num_processes", 0)  # noqa: E731  (0: single-threaded)
        print(f"labeled loader:   {lab:8.1f} patches/s ({workers(labeled)} augmentation workers)")
        print(f"unlabeled stream: {unl:8.1f} patches/s ({workers(unlabeled)} augmentation workers)")
        print(f"stage-2 step: {step:.3f} s (loading included), consuming {bs / step:.1f} patches/s from each stream")
    finally:
        shutdown_stream(unlabeled)
        shutdown_stream(labeled)
        shutdown_stream(validation)


if __name__ == "__main__":
    main()
