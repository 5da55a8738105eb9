"""Label-scarce benchmark on real MRI: nnU-Net on K labeled cases vs BCP on K labeled + the rest unlabeled, and the
all-labeled ceiling, with the same configuration, batch size and iteration budget.

    # once: convert the MSD task, set a seeded test split aside, plan and preprocess, add a batch-size-2 plans variant
    # (--reader NibabelIO where SimpleITK is missing)
    python examples/benchmark_label_scarce.py prepare --msd ../shared/data/Task04_Hippocampus -w bench
    # the protocol: per label-subset seed, the labeled-only model L (trained if missing), then from L for N more
    # iterations (a) labeled-only continued and (b) BCP stage 2 continued (as in the paper, plus the changes --bcp
    # names); each result is appended as it lands
    python examples/benchmark_label_scarce.py protocol -w bench --seeds 0 1 2 -k 2 --iterations 1000 --jobs 1
    # (b) as the plugin trains by default (the supervised term on)
    python examples/benchmark_label_scarce.py protocol -w bench --seeds 0 1 2 -k 2 --bcp bcp_labeled_loss_weight=1
    python examples/benchmark_label_scarce.py protocol -w bench --seeds 0 1 2 -k 2 --bcp bcp_alpha=0.3  # a candidate
    # (a), (b), then candidates in order of priority, 9 runs at once, none started after 300 s; --dry-run lists them
    python examples/benchmark_label_scarce.py protocol -w bench --jobs 9 --no-start-after 300 \
        --candidate bcp_labeled_loss_weight=1 --candidate bcp_teacher_weak_view=true
    # one arm on its own (appends one line to the results file)
    python examples/benchmark_label_scarce.py run -w bench --arm labeled -k 2 --seed 0
    python examples/benchmark_label_scarce.py run -w bench --arm bcp_continue -k 2 --seed 0 --iterations 1000
    python examples/benchmark_label_scarce.py run -w bench --arm ceiling --iterations 2000
    # the tables (paired comparison per seed, every run) in docs/benchmarks.md, and the label-efficiency figure
    python examples/benchmark_label_scarce.py table
    python examples/benchmark_label_scarce.py figure --bcp bcp_labeled_loss_weight=1  # BCP as the plugin's defaults
    # per-epoch validation Dice and BCP pseudo-label figures of one run, from its log
    python examples/benchmark_label_scarce.py curves -w bench --run bcp_continue_k2_s0
    # teacher and student of a kept BCP run scored on the unlabeled cases (their held-back labels); a labeled run's
    # model on the same cases for reference
    python examples/benchmark_label_scarce.py pseudo -w bench --run bcp_continue_k2_s0
    python examples/benchmark_label_scarce.py pseudo -w bench --run labeled_k2_s0

Arms: ``labeled`` = nnUNetTrainerLabelSubset (plain nnU-Net on the K cases of the label subset of ``--seed``),
``bcp`` = nnUNetTrainerBCP from scratch (the same K cases labeled, the pool's other cases unlabeled),
``ceiling`` = nnUNetTrainer on every pool case; ``labeled_continue`` and ``bcp_continue`` start from all weights of
a kept model (``--from``, default the seed's ``labeled_k<K>_s<S>``, trained first if missing) through
``nnUNetv2_bcp_start_from_model`` and train ``--iterations`` more (nnU-Net's poly learning rate restarted; BCP in
stage 2 from the first epoch, teacher = the model). BCP arms train the paper's configuration (``PAPER`` below: the
reference's loss alone) changed only by their ``--bcp`` settings, which the run name carries, so that a run's name
and row keep their meaning when the plugin's defaults change; the plugin's default is
``--bcp bcp_labeled_loss_weight=1``. All: ``3d_fullres``, plans ``nnUNetPlans_bs2`` (nnU-Net's plans
with batch size 2), 25 iterations per epoch, fold 0 of a split whose validation cases (10) are never trained on, test
cases never used in training. Dice by nnU-Net's evaluation of nnUNetv2_predict's output on the test split
(``--test-images/--test-labels`` to use another labeled folder); rows keep the Dice of every test case, and the
validation figures of the final checkpoint (``validation_dice_mean``, ``validation_dice_per_class``,
``validation_dice_per_case``: nnU-Net's ``fold_0/validation/summary.json`` of the run, fold 0's 10 validation cases).
Candidates are chosen on validation (``table``'s first table) or on the unlabeled pool's held-back labels
(``pseudo``), never on the test split, which is reported once per final configuration. Continuation rows record
``from_checkpoint`` (a fingerprint of L's final checkpoint): (a) and (b) are paired only when they started from the
same L, also when L was retrained under the same name.

Run names: ``<arm>_k<K>_s<seed>`` plus ``_it<N>`` when N is not 1000, ``_from-<run>`` for a non-default ``--from``
and the ``--bcp`` settings (``_<name>=<value>``, ``bcp_`` dropped). Each run trains in ``<work>/runs/<run>`` with its
own ``nnUNet_results`` and its own ``nnUNet_preprocessed`` dataset folder (links to the shared preprocessed files, its
own ``bcp_label_subset.json``), so runs of different seeds or arms can train at the same time; its log is
``<work>/<run>.log``, its model is kept in ``<work>/models/<run>``. A run stopped before its row was written (a long CPU
run is often cut short) goes on from its latest epoch the next time it is run, or its protocol is, with the same
settings, device and L (CPU runs save a checkpoint every epoch; the row records ``resumed_at_epoch``); delete
``<work>/runs/<run>`` to start it over.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p, save_json

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = join(HERE, "results", "hippocampus_label_scarce.jsonl")
PSEUDO_RESULTS = join(HERE, "results", "hippocampus_pseudo_label_quality.jsonl")
DOCS = join(HERE, os.pardir, "docs", "benchmarks.md")
FIGURE = join(HERE, os.pardir, "docs", "figures", "label_efficiency.png")
TABLE_START, TABLE_END = "<!-- label-scarce-table:start -->", "<!-- label-scarce-table:end -->"
DATASET_ID = 604
PLANS = "nnUNetPlans_bs2"
DEFAULT_ITERATIONS = 1000
DEFAULT_ITERATIONS_PER_EPOCH = 25
TRAINERS = '''
import json
import os
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_bcp.training.checkpoint import save_nnunet_checkpoint_with
from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP
from nnunetv2_bcp.training.nnUNetTrainerLabelSubset import nnUNetTrainerLabelSubset


def _schedule(t):
    t.num_epochs = int(os.environ["BENCH_EPOCHS"])
    t.num_iterations_per_epoch = int(os.environ["BENCH_ITERATIONS"])
    t.num_val_iterations_per_epoch = 5
    # a long CPU run is often cut short: an interrupted run resumes from its latest epoch (see run())
    t.save_every = 1 if t.device.type == "cpu" else 10


# The paper's stage 2: each BCP run names what it changes from it (--bcp), so that a row keeps its meaning
# when the plugin's defaults change (the supervised term became one after the first rows were written).
PAPER = {"bcp_alpha": 0.5, "bcp_labeled_loss_weight": 0.0, "bcp_teacher_weak_view": False, "bcp_ema_decay": 0.99,
         "bcp_mask_ratio": 2 / 3, "bcp_largest_component": True,
         "bcp_stage_one": "copy_paste", "bcp_pretrain_fraction": 0.2, "bcp_restart_lr": False}


def _settings(t):
    """The benchmark's --bcp NAME=VALUE settings: trainer attributes, set after the trainer's own defaults."""
    for name, value in json.loads(os.environ.get("BENCH_SETTINGS", "{}")).items():
        if not hasattr(t, name):
            raise AttributeError(f"{type(t).__name__} has no attribute {name!r} to set (--bcp {name}=...)")
        setattr(t, name, value)


class _BenchInference:
    """BENCH_NO_MIRRORING=1: the final validation and the predictions of the model without mirroring at inference
    (test-time augmentation; a quarter of the inference time of a 2d model); training augmentation is unchanged."""
    def on_train_start(self):
        super().on_train_start()
        if os.environ.get("BENCH_NO_MIRRORING"):
            self.inference_allowed_mirroring_axes = None


class _AtomicCheckpoints:
    """A run killed while it saves keeps its previous checkpoint to resume from (nnU-Net's own save writes in place;
    the plugin's trainers save atomically already)."""
    def save_checkpoint(self, filename: str) -> None:
        save_nnunet_checkpoint_with(super().save_checkpoint, filename, {})


class BenchLabeled(_BenchInference, nnUNetTrainerLabelSubset):  # saves atomically already
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _schedule(self)
        _settings(self)


class BenchBCP(_BenchInference, nnUNetTrainerBCP):
    uses_label_subset = True  # the run's own label subset

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _schedule(self)
        for name, value in PAPER.items():
            setattr(self, name, value)
        if os.environ.get("BENCH_CONTINUE"):  # continued from a trained model: no stage 1
            self.bcp_pretrain_epochs = 0
        _settings(self)


class BenchCeiling(_BenchInference, _AtomicCheckpoints, nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _schedule(self)
        _settings(self)
'''
# The plugin's defaults, as changes of the benchmark's PAPER configuration (run --plugin-defaults; a test compares
# them with nnUNetTrainerBCP's own): stage 2's, and for a run from scratch the stages'.
PLUGIN_DEFAULTS = {"bcp_labeled_loss_weight": 1, "bcp_largest_component": "auto"}
PLUGIN_STAGE_DEFAULTS = {"bcp_stage_one": "nnunet", "bcp_pretrain_fraction": 0.5, "bcp_restart_lr": True}


def plugin_defaults(from_scratch: bool) -> dict:
    """The settings that make a benchmark BCP run the plugin's defaults (a continuation has no stage 1)."""
    return {**PLUGIN_DEFAULTS, **(PLUGIN_STAGE_DEFAULTS if from_scratch else {})}
ARM_TRAINERS = {"labeled": "BenchLabeled", "bcp": "BenchBCP", "ceiling": "BenchCeiling",
                "labeled_continue": "BenchLabeled", "bcp_continue": "BenchBCP"}
CONTINUE_ARMS = ("labeled_continue", "bcp_continue")
BCP_ARMS = ("bcp", "bcp_continue")


def environment(work: str) -> dict:
    import nnunetv2_bcp
    from nnunetv2_bcp.demo.run_demo import SMALL_MACHINE_ENVIRONMENT
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = join(work, name)
        maybe_mkdir_p(env[name])
    maybe_mkdir_p(join(work, "ext"))
    trainers = join(work, "ext", "bcp_benchmark_trainers.py")
    if not isfile(trainers) or open(trainers).read() != TRAINERS:
        tmp = f"{trainers}.tmp{os.getpid()}"  # runs start in parallel: never let one import a half-written file
        with open(tmp, "w") as f:
            f.write(TRAINERS)
        os.replace(tmp, trainers)
    env["nnUNet_extTrainer"] = os.pathsep.join([nnunetv2_bcp.ext_trainer_dir(), join(work, "ext")])
    for name, value in SMALL_MACHINE_ENVIRONMENT.items():
        env.setdefault(name, value)
    return env


def sh(cmd, env, log=None):
    print("$ " + " ".join(cmd), flush=True)
    exe = join(os.path.dirname(sys.executable), cmd[0])
    with open(log, "a") if log else open(os.devnull, "w") as out:
        subprocess.run([exe if os.path.isfile(exe) else cmd[0], *cmd[1:]], env=env, check=True,
                       stdout=out if log else None, stderr=subprocess.STDOUT if log else None)


def dataset_folder(env) -> str:
    return [join(env["nnUNet_raw"], d) for d in os.listdir(env["nnUNet_raw"]) if d.startswith(f"Dataset{DATASET_ID}_")][0]


# ---------------------------------------------------------------------------------------------- run names, settings
def parse_settings(items) -> dict:
    """``["bcp_alpha=0.3", "bcp_teacher_weak_view=true"]`` -> ``{"bcp_alpha": 0.3, "bcp_teacher_weak_view": True}``
    (values are JSON; a value that is not JSON is taken as a string)."""
    settings = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"--bcp {item!r}: expected NAME=VALUE, e.g. bcp_labeled_loss_weight=1.0")
        try:
            settings[name] = json.loads(value)
        except ValueError:
            settings[name] = value
    return settings


def settings_suffix(settings: dict) -> str:
    """``_alpha=0.3_teacher_weak_view=true``: the settings in a run name, sorted, ``bcp_`` dropped."""
    parts = []
    for name in sorted(settings):
        value = settings[name]
        shown = value if isinstance(value, str) else json.dumps(value).replace(" ", "")
        parts.append(f"{name[4:] if name.startswith('bcp_') else name}={shown}")
    return "".join("_" + p for p in parts)


def labeled_run_name(k: int, seed: int, iterations: int = DEFAULT_ITERATIONS) -> str:
    """The labeled-only model L of a seed: what the continuation arms start from by default."""
    return run_name("labeled", k, seed, iterations)


def run_name(arm: str, k: int, seed: int, iterations: int = DEFAULT_ITERATIONS, settings: dict = None,
             from_run: str = None) -> str:
    name = f"{arm}_k{k}_s{seed}"
    if iterations != DEFAULT_ITERATIONS:
        name += f"_it{iterations}"
    if from_run is not None and from_run != labeled_run_name(k, seed):
        name += f"_from-{from_run}"
    return name + settings_suffix(settings or {})


def parse_run_name(name: str) -> dict:
    """``k`` and ``seed`` of a run name (``seed`` None for names without one, e.g. ``bcp_k4``)."""
    m = re.search(r"_k(\d+)(?:_s(\d+))?", name)
    if m is None:
        raise SystemExit(f"{name}: not a run name of this benchmark (<arm>_k<K>_s<seed>...)")
    return {"k": int(m.group(1)), "seed": None if m.group(2) is None else int(m.group(2))}


# ------------------------------------------------------------------------------------------------- per-run folders
def run_environment(work: str, name: str, subset: dict = None, resume: bool = False, dataset: str = None):
    """Environment of one run: the shared raw data and trainers, its own ``nnUNet_results`` and its own
    ``nnUNet_preprocessed`` whose dataset folder links to the shared preprocessed files but holds its own label subset
    (or none) and its own copy of BCP's unlabeled data (the plugin rewrites that copy to match the subset).
    ``resume``: keep the folder of an interrupted run as it is; otherwise it starts empty. ``dataset``: the dataset
    folder's name (default: this benchmark's)."""
    from nnunetv2_bcp.unlabeled.label_subset import LABEL_SUBSET_FILE
    env = environment(work)
    dataset = dataset or os.path.basename(dataset_folder(env))
    shared = join(env["nnUNet_preprocessed"], dataset)
    run_dir = join(work, "runs", name)
    own = join(run_dir, "nnUNet_preprocessed", dataset)
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
        maybe_mkdir_p(own)
        for entry in os.listdir(shared):
            if entry == LABEL_SUBSET_FILE or entry.endswith("_unlabeled") or entry.startswith("."):
                continue  # per run: the label subset, the unlabeled copy (made for that subset) and its lock
            os.symlink(join(shared, entry), join(own, entry))
        if subset is not None:
            save_json(subset, join(own, LABEL_SUBSET_FILE), sort_keys=False)
    env["nnUNet_preprocessed"] = join(run_dir, "nnUNet_preprocessed")
    env["nnUNet_results"] = join(run_dir, "nnUNet_results")
    maybe_mkdir_p(env["nnUNet_results"])
    return env, own


def code_version(root: str = join(HERE, os.pardir)) -> str:
    """The commit the run's code is at, ``+changes`` when its tracked files differ from it outside
    ``examples/results``, where the runs append their rows (``BENCH_CODE_VERSION`` where the code travelled without
    its git history, e.g. to the device machine)."""
    if os.environ.get("BENCH_CODE_VERSION"):
        return os.environ["BENCH_CODE_VERSION"]
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)examples/results"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def append_row(path: str, row: dict) -> None:
    """One line, one write, under an exclusive lock: parallel runs never interleave their rows."""
    import fcntl
    maybe_mkdir_p(os.path.dirname(os.path.abspath(path)))
    line = json.dumps(row) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def reader_writer(dataset_json: dict):
    """The dataset's image reader (``overwrite_image_reader_writer`` if set, e.g. NibabelIO), else SimpleITKIO."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    return recursive_find_reader_writer_by_name(dataset_json.get("overwrite_image_reader_writer", "SimpleITKIO"))()


def dice_per_case(summary: dict, file_ending: str, labels) -> dict:
    """``{case: {"1": Dice, "2": Dice}}`` from nnU-Net's summary.json ``metric_per_case``."""
    cases = {}
    for entry in summary["metric_per_case"]:
        case = os.path.basename(entry["reference_file"])[:-len(file_ending)]
        cases[case] = {str(c): entry["metrics"][str(c)]["Dice"] for c in labels}
    return cases


def validation_figures(fold_folder: str, file_ending: str, labels) -> dict:
    """The Dice of nnU-Net's own validation at the end of training (``<fold>/validation/summary.json``: the final
    checkpoint on fold 0's validation cases, which no arm trains on), as row fields; ``{}`` where it is missing. These
    are the figures candidates are chosen on; the test split is only reported."""
    path = join(fold_folder, "validation", "summary.json")
    if not isfile(path):
        print(f"no {path}: the row carries no validation figures", flush=True)
        return {}
    summary = load_json(path)
    return {"validation_dice_mean": summary["foreground_mean"]["Dice"],
            "validation_dice_per_class": {str(c): summary["mean"][str(c)]["Dice"] for c in labels},
            "validation_dice_per_case": dice_per_case(summary, file_ending, labels),
            "validation_num_cases": len(summary["metric_per_case"])}


def checkpoint_id(path: str) -> str:
    """A short fingerprint of a checkpoint file: continuation rows record the model they started from, so that (a)
    and (b) are paired only when they started from the same L (a retrained L keeps its run name)."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def prepare(args):
    env = environment(args.work_dir)
    sh(["nnUNetv2_convert_MSD_dataset", "-i", os.path.abspath(args.msd), "-overwrite_id", str(DATASET_ID)], env)
    folder = dataset_folder(env)
    dataset_json = load_json(join(folder, "dataset.json"))
    ending = dataset_json["file_ending"]
    cases = sorted(f[:-len(ending)] for f in os.listdir(join(folder, "labelsTr")) if f.endswith(ending))
    test = sorted(np.random.default_rng(args.seed).choice(cases, args.num_test, replace=False).tolist())
    shutil.rmtree(join(folder, "imagesTs"), ignore_errors=True)  # MSD's unlabeled test images are not used
    for sub in ("imagesTs", "labelsTs"):
        maybe_mkdir_p(join(folder, sub))
    for case in test:
        for f in os.listdir(join(folder, "imagesTr")):
            if f.startswith(case + "_"):
                shutil.move(join(folder, "imagesTr", f), join(folder, "imagesTs", f))
        shutil.move(join(folder, "labelsTr", case + ending), join(folder, "labelsTs", case + ending))
    dataset_json["numTraining"] = len(cases) - len(test)
    if args.reader:
        dataset_json["overwrite_image_reader_writer"] = args.reader
    save_json(dataset_json, join(folder, "dataset.json"), sort_keys=False)
    sh(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2"], env)
    pre = join(env["nnUNet_preprocessed"], os.path.basename(folder))
    plans = load_json(join(pre, "nnUNetPlans.json"))
    plans["plans_name"] = PLANS
    plans["configurations"]["3d_fullres"]["batch_size"] = 2  # same preprocessed data (data_identifier unchanged)
    save_json(plans, join(pre, PLANS + ".json"), sort_keys=False)
    pool = sorted(set(cases) - set(test))
    val = sorted(np.random.default_rng(args.seed + 1).choice(pool, 10, replace=False).tolist())
    save_json([{"train": [c for c in pool if c not in val], "val": val}], join(pre, "splits_final.json"))
    save_json({"test": test, "val": val, "seed": args.seed}, join(args.work_dir, "benchmark_split.json"))
    print(f"{len(pool) - len(val)} training, {len(val)} validation, {len(test)} test cases")


def settings_of(args) -> dict:
    """The trainer settings of a run: the plugin's defaults if asked for (a BCP arm), then ``--bcp``, then the older
    ``--bcp-pretrain-epochs``/``--bcp-alpha``."""
    settings = {}
    arm = getattr(args, "arm", None)
    if getattr(args, "plugin_defaults", False) and arm in BCP_ARMS:
        settings.update(plugin_defaults(from_scratch=arm == "bcp"))
    settings.update(parse_settings(getattr(args, "bcp", None)))
    if getattr(args, "bcp_pretrain_epochs", None) is not None:
        settings["bcp_pretrain_epochs"] = args.bcp_pretrain_epochs
    if getattr(args, "bcp_alpha", None) is not None:
        settings["bcp_alpha"] = args.bcp_alpha
    return settings


def reproduce_command(args, arm: str, k: int, settings: dict) -> str:
    """The ``run`` command line of a row (work dir and device left out: the row records the device)."""
    parts = ["python examples/benchmark_label_scarce.py run", f"--arm {arm}", f"-k {k}", f"--seed {args.seed}",
             f"--iterations {args.iterations}"]
    if args.iterations_per_epoch != DEFAULT_ITERATIONS_PER_EPOCH:
        parts.append(f"--iterations-per-epoch {args.iterations_per_epoch}")
    if arm in CONTINUE_ARMS and args.from_run:
        parts.append(f"--from {args.from_run}")
    if arm in CONTINUE_ARMS and args.from_iterations != DEFAULT_ITERATIONS:
        parts.append(f"--from-iterations {args.from_iterations}")
    parts += [f"--bcp {name}={json.dumps(value)}" for name, value in sorted(settings.items())]
    parts += [f"--test-images {args.test_images}"] * bool(args.test_images)
    parts += [f"--test-labels {args.test_labels}"] * bool(args.test_labels)
    return " ".join(parts)


RUN_START = "bench_run.json"  # in <work>/runs/<run>: what the run was started with, to resume it only as it began


def interrupted_run(run_dir: str, fold_dir: str, started: dict):
    """An earlier start of this run that was stopped before its row was written (a long CPU run is often cut short): the
    checkpoint to resume with ``--c`` and the seconds its finished epochs took, or None when there is none or it was
    started otherwise (other iterations, settings, device, or another L)."""
    import torch
    record = join(run_dir, RUN_START)
    try:
        if not isfile(record) or load_json(record) != started:
            return None
        for checkpoint in ("checkpoint_final.pth", "checkpoint_latest.pth"):  # the order in which --c looks
            path = join(fold_dir, checkpoint)
            if isfile(path):
                saved = torch.load(path, map_location="cpu", weights_only=False)
                times = saved["logging"]
                seconds = sum(end - begin for begin, end in zip(times.get("epoch_start_timestamps", []),
                                                                  times.get("epoch_end_timestamps", [])))
                return {"checkpoint": path, "epoch": saved["current_epoch"], "seconds": seconds}
    except Exception as e:  # a record or checkpoint cut short by the kill: nothing to resume from
        print(f"{os.path.basename(run_dir)}: the interrupted run cannot be resumed ({type(e).__name__}: {e}); "
              "it starts over", flush=True)
    return None


def model_done(work: str, name: str) -> bool:
    """A run whose model is kept and whose row was written (``result.json`` is written beside the model last)."""
    return isfile(join(work, "models", name, "result.json"))


def run(args) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2_bcp.demo.run_demo import SMALL_MACHINE_ENVIRONMENT
    from nnunetv2_bcp.unlabeled.label_subset import choose_label_subset
    work = args.work_dir
    settings = settings_of(args)
    env = environment(work)
    folder = dataset_folder(env)
    dataset = os.path.basename(folder)
    dataset_json = load_json(join(folder, "dataset.json"))
    splits = load_json(join(env["nnUNet_preprocessed"], dataset, "splits_final.json"))
    train = splits[0]["train"]
    k = len(train) if args.arm == "ceiling" else args.k
    from_run = None
    if args.arm in CONTINUE_ARMS:
        from_run = args.from_run or labeled_run_name(k, args.seed, args.from_iterations)
        start_model = join(work, "models", from_run)
        if not isfile(join(start_model, "fold_0", "checkpoint_final.pth")):
            if args.from_run:
                raise SystemExit(f"--from {from_run}: no model in {start_model}")
            print(f"{from_run} is not in {join(work, 'models')}: training it first", flush=True)
            run(argparse.Namespace(**{**vars(args), "arm": "labeled", "iterations": args.from_iterations, "bcp": None,
                                      "bcp_alpha": None, "bcp_pretrain_epochs": None}))
    name = run_name(args.arm, k, args.seed, args.iterations, settings, from_run)
    subset = None if args.arm == "ceiling" else choose_label_subset(train, splits, num_labeled=k, seed=args.seed)
    epochs = args.iterations // args.iterations_per_epoch
    trainer = ARM_TRAINERS[args.arm]
    run_dir = join(work, "runs", name)
    fold_dir = join(run_dir, "nnUNet_results", dataset, f"{trainer}__{PLANS}__3d_fullres", "fold_0")
    from_checkpoint = checkpoint_id(join(start_model, "fold_0", "checkpoint_final.pth")) if from_run else None
    started = {"run": name, "epochs": epochs, "iterations_per_epoch": args.iterations_per_epoch,
               "settings": settings, "device": args.device, "from_checkpoint": from_checkpoint,
               "environment": {n: env[n] for n in SMALL_MACHINE_ENVIRONMENT}}  # its timings are of one setting
    earlier = interrupted_run(run_dir, fold_dir, started)
    env, _ = run_environment(work, name, subset, resume=earlier is not None)
    if earlier is None:
        save_json(started, join(run_dir, RUN_START), sort_keys=False)
    env.update(BENCH_EPOCHS=str(epochs), BENCH_ITERATIONS=str(args.iterations_per_epoch),
               BENCH_SETTINGS=json.dumps(settings))
    log = join(work, f"{name}.log")
    results_folder = os.path.dirname(fold_dir)
    train_cmd = ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-p", PLANS, "-tr", trainer, "-device",
                 args.device]
    start = time.time()
    if from_run:
        env["BENCH_CONTINUE"] = "1"
    if earlier is not None:
        print(f"{name}: resuming the interrupted run from {os.path.basename(earlier['checkpoint'])} (epoch "
              f"{earlier['epoch']} of {epochs}; delete {run_dir} to start it over)", flush=True)
        train_cmd.append("--c")
    elif from_run:
        sh(["nnUNetv2_bcp_start_from_model", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-p", PLANS,
            "-m", join(start_model, "fold_0", "checkpoint_final.pth")], env, log)
        train_cmd.append("--c")
    sh(train_cmd, env, log)
    # an interrupted run counts the epochs it had finished before (the time of the epoch it lost is not counted)
    train_seconds = time.time() - start + (earlier["seconds"] if earlier else 0)
    test_images = args.test_images or join(folder, "imagesTs")
    test_labels = args.test_labels or join(folder, "labelsTs")
    pred = join(work, f"pred_{name}")
    shutil.rmtree(pred, ignore_errors=True)
    sh(["nnUNetv2_predict", "-i", test_images, "-o", pred, "-d", str(DATASET_ID), "-c", "3d_fullres", "-p", PLANS,
        "-f", "0", "-tr", trainer, "-device", args.device, "-npp", "1", "-nps", "1"], env, log)
    labels = [1, 2]
    compute_metrics_on_folder(test_labels, pred, join(pred, "summary.json"), reader_writer(dataset_json),
                              dataset_json["file_ending"], labels, num_processes=2)
    summary = load_json(join(pred, "summary.json"))
    result = {"run": name, "arm": args.arm, "k": k, "seed": args.seed, "from": from_run,
              "from_iterations": None, "iterations": epochs * args.iterations_per_epoch, "settings": settings,
              "dice_per_class": {str(c): summary["mean"][str(c)]["Dice"] for c in labels},
              "dice_mean": summary["foreground_mean"]["Dice"],
              "dice_per_case": dice_per_case(summary, dataset_json["file_ending"], labels),
              "train_seconds": round(train_seconds), "wall_seconds": round(time.time() - start),
              "device": args.device, "num_test": len(summary["metric_per_case"]),
              "test_set": os.path.abspath(args.test_labels) if args.test_labels else "split", "trainer": trainer,
              "plans": PLANS, "date": time.strftime("%Y-%m-%d"),
              "environment": started["environment"], "code": code_version(),
              "command": reproduce_command(args, args.arm, k, settings)}
    result.update(validation_figures(join(results_folder, "fold_0"), dataset_json["file_ending"], labels))
    if earlier is not None:
        result["resumed_at_epoch"] = earlier["epoch"]
    if from_run:
        result["from_checkpoint"] = from_checkpoint
        start_result = join(start_model, "result.json")
        result["from_iterations"] = load_json(start_result)["iterations"] if isfile(start_result) \
            else args.from_iterations  # a model kept before rows were stored beside it
    if args.arm in BCP_ARMS:
        result["bcp_settings"] = load_json(join(results_folder, "fold_0", "bcp_settings.json"))
        progress_file = join(results_folder, "fold_0", "bcp_progress.json")
        if args.arm == "bcp" and isfile(progress_file):  # stage 1 may go on while the student misses a class
            progress = load_json(progress_file)
            result["bcp_stage1_epochs"] = progress[0]["epoch"] if progress else epochs
    # keep the trained model of every run (another run of the same name starts again from a clean folder)
    kept = join(work, "models", name)
    maybe_mkdir_p(os.path.dirname(kept))
    shutil.rmtree(kept, ignore_errors=True)
    shutil.move(results_folder, kept)
    result["model_folder"] = os.path.relpath(kept, work)
    append_row(args.results, result)
    save_json(result, join(kept, "result.json"), sort_keys=False)
    shutil.rmtree(join(work, "runs", name), ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("dice_per_case", "validation_dice_per_case")}))
    return result


def parse_candidate(text: str) -> dict:
    """``"bcp_alpha=0.3,bcp_teacher_weak_view=true"`` -> the settings of one candidate (``--candidate``)."""
    return parse_settings([item for item in text.split(",") if item])


def protocol(args):
    """Per seed: the labeled-only model L (trained if missing), then (a) labeled-only and (b) BCP continued from it,
    then each ``--candidate`` (BCP continued with its settings) on every seed, in that order of priority: up to
    ``--jobs`` runs at once (each a ``run`` subprocess with its output in ``<work>/<run>.out``), none started later
    than ``--no-start-after`` seconds after the protocol began (a run that cannot finish in a time limit is not
    begun)."""
    settings = parse_settings(args.bcp)
    candidates = [parse_candidate(c) for c in getattr(args, "candidate", None) or []]
    deadline = None if getattr(args, "no_start_after", None) is None else time.time() + args.no_start_after
    dry_run = getattr(args, "dry_run", False)
    base = [sys.executable, os.path.abspath(__file__), "run", "-w", args.work_dir, "-k", str(args.k),
            "--device", args.device, "--results", args.results, "--iterations-per-epoch",
            str(args.iterations_per_epoch)]
    for option in ("test_images", "test_labels"):
        if getattr(args, option):
            base += ["--" + option.replace("_", "-"), getattr(args, option)]
    models = join(args.work_dir, "models")
    first = {s: labeled_run_name(args.k, s, args.from_iterations) for s in args.seeds}
    missing = [s for s in args.seeds if not isfile(join(models, first[s], "fold_0", "checkpoint_final.pth"))]
    failed = run_jobs([(first[s], base + ["--arm", "labeled", "--seed", str(s), "--iterations",
                                          str(args.from_iterations)]) for s in missing], args.jobs, args.work_dir,
                      deadline, dry_run)
    # (a) and (b) of every seed first, then each candidate on every seed: the order in which runs start
    arms = [(arm, arm_settings) for arm, arm_settings in (("labeled_continue", {}), ("bcp_continue", settings))
            if arm in args.arms]
    batches = [[(s, arm, arm_settings) for s in args.seeds for arm, arm_settings in arms]]
    batches += [[(s, "bcp_continue", candidate) for s in args.seeds] for candidate in candidates]
    jobs = []
    for s, arm, arm_settings in (job for batch in batches for job in batch):
        if first[s] in failed:
            continue
        name = run_name(arm, args.k, s, args.iterations, arm_settings, first[s])
        if model_done(args.work_dir, name) and not args.redo:
            print(f"{name}: done before (its model is in {models}); --redo runs it again")
            continue
        if name in (n for n, _ in jobs):
            continue  # a candidate that repeats (b)'s settings
        jobs.append((name, base + ["--arm", arm, "--seed", str(s), "--iterations", str(args.iterations),
                                   "--from-iterations", str(args.from_iterations)]
                     + [a for n, v in arm_settings.items() for a in ("--bcp", f"{n}={json.dumps(v)}")]))
    failed += run_jobs(jobs, args.jobs, args.work_dir, deadline, dry_run)
    if failed:
        raise SystemExit(f"failed or not started: {failed} (see <run>.out and <run>.log in {args.work_dir})")


def run_jobs(jobs, num_parallel: int, work: str, deadline: float = None, dry_run: bool = False) -> list:
    """Run ``(name, argv)`` jobs in their order, at most ``num_parallel`` at once, none started after ``deadline``
    (``time.time()``); the names of those that failed or were not started. ``dry_run``: print them instead."""
    if dry_run:
        for name, argv in jobs:
            print(f"would run {name}: {' '.join(argv)}", flush=True)
        return []

    def one(job):
        name, argv = job
        if deadline is not None and time.time() > deadline:
            print(f"NOT STARTED (--no-start-after): {name}", flush=True)
            return name
        print(f"start {name}", flush=True)
        with open(join(work, f"{name}.out"), "a") as out:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
        print(f"{'done' if code == 0 else f'FAILED ({code})'}: {name}", flush=True)
        return None if code == 0 else name
    if not jobs:
        return []
    with ThreadPoolExecutor(max(1, num_parallel)) as pool:
        return [name for name in pool.map(one, jobs) if name is not None]


# ------------------------------------------------------------------------------------------------ tables, figure
def load_rows(path: str) -> list:
    return [json.loads(line) for line in open(path) if line.strip()] if isfile(path) else []


def case_means(row: dict) -> dict:
    """Per test case: the mean Dice over the classes."""
    return {case: float(np.nanmean(list(dice.values()))) for case, dice in row["dice_per_case"].items()}


def paired_statistics(a: dict, b: dict, num_resamples: int = 10000, seed: int = 0,
                      cluster: Optional[Callable] = None) -> dict:
    """(b) - (a) on the cases both have: mean difference, its percentile-bootstrap 95% interval, the Wilcoxon
    signed-rank p-value (1 when every difference is 0) and in how many cases (b) is better.

    ``cluster`` (case -> its group, e.g. the patient of a frame): cases of one group are not independent, so the
    bootstrap draws whole groups and the Wilcoxon test runs on the groups' mean differences (``clusters``: their
    number); the mean and ``better`` stay per case."""
    from scipy.stats import wilcoxon
    cases = sorted(set(a) & set(b))
    diff = np.array([b[c] - a[c] for c in cases])
    rng = np.random.default_rng(seed)
    result = {"n": len(cases), "mean": float(diff.mean()), "better": int(np.sum(diff > 0))}
    if cluster is None:
        units, sizes = diff, np.ones(len(diff))
    else:
        groups = sorted({cluster(c) for c in cases}, key=str)
        index = {g: i for i, g in enumerate(groups)}
        members = np.array([index[cluster(c)] for c in cases])
        units, sizes = np.bincount(members, diff), np.bincount(members).astype(float)  # per group: sum, count
        result["clusters"] = len(groups)
    draws = rng.integers(0, len(units), (num_resamples, len(units)))
    means = units[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    unit_means = units / sizes
    result["p"] = 1.0 if not np.any(diff) else float(wilcoxon(unit_means).pvalue)
    result["ci"] = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
    return result


def comparisons(rows: list) -> list:
    """The protocol's pairs: each (b) ``bcp_continue`` row with the (a) ``labeled_continue`` row of the same K, seed,
    starting model (its name and, where recorded, its checkpoint: a retrained L keeps its name), iterations and test
    set (the latest of each); grouped by (K, settings, iterations, test set). A seed has one pair per L it was
    trained from: an L retrained in another session (on another device, say) gives that seed a second pair, shown
    beside the first, never mixed with it."""
    def key(r):
        return (r["k"], r["seed"], r["from"], r.get("from_checkpoint"), r["from_iterations"], r["iterations"],
                r["test_set"])
    latest_a = {key(r): r for r in rows if r.get("arm") == "labeled_continue"}
    groups = {}
    for r in rows:
        if r.get("arm") == "bcp_continue" and key(r) in latest_a:
            group = (r["k"], json.dumps(r["settings"], sort_keys=True), r["from_iterations"], r["iterations"],
                     r["test_set"])
            groups.setdefault(group, {})[key(r)] = (latest_a[key(r)], r)  # a later row of one pair replaces it
    return [{"k": g[0], "settings": json.loads(g[1]), "from_iterations": g[2], "iterations": g[3], "test_set": g[4],
             "pairs": sorted(({"seed": a["seed"], "device": b["device"], "a": a, "b": b} for a, b in pairs.values()),
                             key=lambda p: (p["seed"], p["device"]))}
            for g, pairs in sorted(groups.items(), key=str)]


def pair_label(pair: dict, group: dict) -> str:
    """A pair's seed, with its device where the group's pairs ran on more than one, and its L's fingerprint where
    the seed has several pairs on that device."""
    label = str(pair["seed"])
    if len({p["device"] for p in group["pairs"]}) > 1:
        label += f" ({pair['device']})"
    if sum(p["seed"] == pair["seed"] and p["device"] == pair["device"] for p in group["pairs"]) > 1:
        label += f" L {pair['a'].get('from_checkpoint') or 'unrecorded'}"
    return label


def comparison_table(group: dict) -> str:
    settings = " ".join(f"--bcp {n}={json.dumps(v)}" for n, v in sorted(group["settings"].items()))
    seeds = sorted({p["seed"] for p in group["pairs"]})
    test = "the benchmark's test split" if group["test_set"] == "split" else f"`{group['test_set']}`"
    lines = [f"**K = {group['k']}, BCP {'settings `' + settings + '`' if settings else 'as in the paper'}**: L "
             f"{group['from_iterations']} iterations, then {group['iterations']} more; scored on {test}. Reproduce: "
             f"`python examples/benchmark_label_scarce.py protocol -w bench --seeds {' '.join(map(str, seeds))} "
             f"-k {group['k']} --iterations {group['iterations']}"
             + (f" --from-iterations {group['from_iterations']}" if group["from_iterations"] != DEFAULT_ITERATIONS
                else "") + (f" {settings}" if settings else "") + "`", "",
             "| seed | (a) labeled-only continued | (b) BCP continued | (b) − (a) | per case: mean (b) − (a) "
             "[95% bootstrap CI] | Wilcoxon p | (b) better in |", "|---|---|---|---|---|---|---|"]
    for pair in group["pairs"]:
        a, b = pair["a"], pair["b"]
        stats = paired_statistics(case_means(a), case_means(b))
        lines.append(f"| {pair_label(pair, group)} | {a['dice_mean']:.4f} | {b['dice_mean']:.4f} | "
                     f"{b['dice_mean'] - a['dice_mean']:+.4f} | {stats['mean']:+.4f} [{stats['ci'][0]:+.4f}, "
                     f"{stats['ci'][1]:+.4f}] | {stats['p']:.2g} | {stats['better']} of {stats['n']} |")

    def mean_line(label, pairs):
        a_mean, b_mean = (np.mean([p[arm]["dice_mean"] for p in pairs]) for arm in "ab")
        return f"| {label} | {a_mean:.4f} | {b_mean:.4f} | {b_mean - a_mean:+.4f} | | | |"
    devices = sorted({p["device"] for p in group["pairs"]})
    if len(devices) > 1:  # each device's set of pairs, then all of them
        for device in devices:
            pairs = [p for p in group["pairs"] if p["device"] == device]
            lines.append(mean_line(f"mean of {len(pairs)} on {device} (seeds "
                                   f"{' '.join(str(p['seed']) for p in pairs)})", pairs))
        lines.append(mean_line(f"mean of all {len(group['pairs'])}", group["pairs"]))
    else:
        lines.append(mean_line(f"mean of {len(group['pairs'])}", group["pairs"]))
    return "\n".join(lines)


def from_scratch_comparisons(rows: list) -> list:
    """BCP from scratch (arm ``bcp``, e.g. the one command) paired with nnU-Net from scratch (arm ``labeled``) of the
    same K, seed, iterations and test set (the latest of each), grouped by (K, BCP settings, iterations, test set);
    each pair with the two-command row of that seed at the same total iterations whose settings the BCP run also has
    (``recipe``: of those the one that has the most, the latest of equals; None where there is none)."""
    def key(r):
        return r["k"], r["seed"], r["iterations"], r["test_set"]
    latest_labeled = {key(r): r for r in rows if r.get("arm") == "labeled"}
    groups = {}
    for r in rows:
        if r.get("arm") == "bcp" and key(r) in latest_labeled:
            group = (r["k"], json.dumps(r["settings"], sort_keys=True), r["iterations"], r["test_set"])
            groups.setdefault(group, {})[key(r)] = (latest_labeled[key(r)], r)

    def recipe(b):
        same = [r for r in rows if r.get("arm") == "bcp_continue" and (r["k"], r["seed"], r["test_set"]) ==
                (b["k"], b["seed"], b["test_set"]) and r["from_iterations"] + r["iterations"] == b["iterations"]
                and all(b["settings"].get(n) == v for n, v in r["settings"].items())]
        return max(reversed(same), key=lambda r: len(r["settings"])) if same else None  # the closest, latest
    return [{"k": g[0], "settings": json.loads(g[1]), "iterations": g[2], "test_set": g[3],
             "pairs": sorted(({"seed": a["seed"], "a": a, "b": b, "recipe": recipe(b)} for a, b in pairs.values()),
                             key=lambda p: p["seed"])}
            for g, pairs in sorted(groups.items(), key=str)]


def from_scratch_table(group: dict) -> str:
    """Per seed: nnU-Net and BCP from scratch on the test split, their per-case paired difference, the same on the
    validation cases, and BCP against the two-command recipe of the same total iterations (another start model: not
    a paired start); then the means."""
    settings = " ".join(f"--bcp {n}={json.dumps(v)}" for n, v in sorted(group["settings"].items()))
    test = "the benchmark's test split" if group["test_set"] == "split" else f"`{group['test_set']}`"
    lines = [f"**K = {group['k']}, {group['iterations']} iterations from scratch, BCP "
             f"{'settings `' + settings + '`' if settings else 'as in the paper'}**, scored on {test}. Reproduce: "
             f"`python examples/benchmark_label_scarce.py run --arm labeled -k {group['k']} --seed S --iterations "
             f"{group['iterations']}` and `... run --arm bcp -k {group['k']} --seed S --iterations "
             f"{group['iterations']}{' ' + settings if settings else ''}`", "",
             "| seed | nnU-Net | BCP | BCP − nnU-Net | per test case [95% bootstrap CI] | BCP better in | "
             "validation: nnU-Net / BCP | per validation case [95% CI] | two-command recipe (same total) | "
             "BCP − recipe |", "|---|---|---|---|---|---|---|---|---|---|"]
    for pair in group["pairs"]:
        a, b, recipe = pair["a"], pair["b"], pair["recipe"]
        test_stats = paired_statistics(case_means(a), case_means(b))
        validation, validation_stats = "–", "–"
        if "validation_dice_mean" in a and "validation_dice_mean" in b:
            validation = f"{a['validation_dice_mean']:.4f} / {b['validation_dice_mean']:.4f}"
            v = paired_statistics(validation_case_means(a), validation_case_means(b))
            validation_stats = f"{v['mean']:+.4f} [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}], {v['better']} of {v['n']}"
        against = "–", "–"
        if recipe is not None:
            r = paired_statistics(case_means(recipe), case_means(b))
            against = (f"{recipe['dice_mean']:.4f} (`{recipe['run']}`)",
                       f"{r['mean']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]")
        lines.append(f"| {pair['seed']} | {a['dice_mean']:.4f} | {b['dice_mean']:.4f} | "
                     f"{b['dice_mean'] - a['dice_mean']:+.4f} | {test_stats['mean']:+.4f} [{test_stats['ci'][0]:+.4f}, "
                     f"{test_stats['ci'][1]:+.4f}] | {test_stats['better']} of {test_stats['n']} | {validation} | "
                     f"{validation_stats} | {against[0]} | {against[1]} |")
    pairs = group["pairs"]
    a_mean, b_mean = (np.mean([p[arm]["dice_mean"] for p in pairs]) for arm in "ab")
    recipes = [p["recipe"]["dice_mean"] for p in pairs if p["recipe"] is not None]
    recipe_mean = (f"{np.mean(recipes):.4f} ({len(recipes)} of {len(pairs)} seeds)", "") if recipes else ("–", "")
    if len(recipes) == len(pairs):
        recipe_mean = (recipe_mean[0], f"{b_mean - np.mean(recipes):+.4f}")
    lines.append(f"| mean of {len(pairs)} | {a_mean:.4f} | {b_mean:.4f} | {b_mean - a_mean:+.4f} | | | | | "
                 f"{recipe_mean[0]} | {recipe_mean[1]} |")
    return "\n".join(lines)


def validation_case_means(row: dict) -> dict:
    """Per validation case: the mean Dice over the classes (``{}`` for rows without validation figures)."""
    return {case: float(np.nanmean(list(dice.values())))
            for case, dice in row.get("validation_dice_per_case", {}).items()}


def candidates_table(groups: list) -> str:
    """One line per candidate (BCP settings) of the paired comparisons: (b) − (a) in nnU-Net's validation Dice of the
    final checkpoints, per pair (seed), their mean, and per validation case over all pairs. Candidates are chosen
    here; the test split is not shown, so that it is not used to choose."""
    lines = ["| K | BCP settings | iterations | validation (b) − (a) per pair (seed) | mean of the pairs | "
             "(b) validation Dice, mean | per case, all pairs: mean (b) − (a) [95% bootstrap CI] | (b) better in |",
             "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        settings = " ".join(f"`{n}={json.dumps(v)}`" for n, v in sorted(g["settings"].items())) or "as in the paper"
        if g["test_set"] != "split":
            settings += f" (runs scored on `{g['test_set']}`)"
        diffs, b_values, a_cases, b_cases = {}, [], {}, {}
        labels = [pair_label(pair, g) for pair in g["pairs"]]
        for pair, label in zip(g["pairs"], labels):
            a, b = pair["a"], pair["b"]
            if "validation_dice_mean" in a and "validation_dice_mean" in b:
                diffs[label] = b["validation_dice_mean"] - a["validation_dice_mean"]
                b_values.append(b["validation_dice_mean"])
                a_cases.update({(label, c): v for c, v in validation_case_means(a).items()})
                b_cases.update({(label, c): v for c, v in validation_case_means(b).items()})
        per_pair = ", ".join(f"{label}: {diffs[label]:+.4f}" if label in diffs else f"{label}: –" for label in labels)
        if diffs:
            mean = f"{np.mean(list(diffs.values())):+.4f} ({len(diffs)} of {len(labels)} pairs)"
            b_mean = f"{np.mean(b_values):.4f}"
        else:
            mean = b_mean = "–"
        paired, better = "–", "–"
        if set(a_cases) & set(b_cases):
            # one case's pairs of different seeds are not independent: whole cases are resampled
            stats = paired_statistics(a_cases, b_cases, cluster=lambda seed_and_case: seed_and_case[1])
            paired = f"{stats['mean']:+.4f} [{stats['ci'][0]:+.4f}, {stats['ci'][1]:+.4f}]"
            better = f"{stats['better']} of {stats['n']}"
        total = g["from_iterations"] + g["iterations"] if g["from_iterations"] is not None else g["iterations"]
        lines.append(f"| {g['k']} | {settings} | {g['from_iterations']} + {g['iterations']} = {total} | {per_pair} | "
                     f"{mean} | {b_mean} | {paired} | {better} |")
    return "\n".join(lines)


def runs_table(rows: list) -> str:
    lines = ["| run | labeled cases | seed | from | iterations | Dice anterior | Dice posterior | mean Dice | "
             "validation mean Dice | train time | reproduce |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["k"], r["seed"], r["run"])):
        start = f"{r['from']} ({r['from_iterations']})" if r.get("from") else "scratch"
        validation = f"{r['validation_dice_mean']:.4f}" if "validation_dice_mean" in r else "–"
        lines.append(f"| {r['run']} | {r['k']} | {r['seed']} | {start} | {r['iterations']} | "
                     f"{r['dice_per_class']['1']:.4f} | {r['dice_per_class']['2']:.4f} | {r['dice_mean']:.4f} | "
                     f"{validation} | {r['train_seconds'] / 60:.0f} min ({r['device']}) | `{r['command']}` |")
    return "\n".join(lines)


def earlier_table(rows: list) -> str:
    """Rows from before run names carried the seed: each arm from scratch, one label subset (seed 0)."""
    lines = ["| arm | labeled cases | Dice anterior | Dice posterior | mean Dice | iterations | train time | seed |",
             "|---|---|---|---|---|---|---|---|"]
    order = {"labeled": 0, "bcp": 1, "ceiling": 2}
    for r in sorted(rows, key=lambda r: (r["k"], order.get(r["arm"], 3))):
        arm = f"{r['arm']} ({r['trainer']})"
        if "bcp_stage1_epochs" in r:
            arm += (f", stage 1: {r['bcp_stage1_epochs']} epochs ({r['bcp_pretrain_epochs']} or more, until every "
                    f"class has validation Dice ≥ {r['bcp_pretrain_min_dice']})")
        elif "bcp_pretrain_epochs" in r:
            arm += f", stage 1: {r['bcp_pretrain_epochs']} epochs (fixed)"
        if r.get("bcp_alpha", 0.5) != 0.5:
            arm += f", α = {r['bcp_alpha']:g}"
        lines.append(f"| {arm} | {r['k']} | {r['dice_per_class']['1']:.4f} | "
                     f"{r['dice_per_class']['2']:.4f} | {r['dice_mean']:.4f} | {r['iterations']} | "
                     f"{r['train_seconds'] / 60:.0f} min ({r['device']}) | {r['seed']} |")
    return "\n".join(lines)


DOCS_INTRO = """# Benchmarks

## Label-scarce benchmark (MSD Hippocampus)

`examples/benchmark_label_scarce.py` (its docstring has every command). Once:
`python examples/benchmark_label_scarce.py prepare --msd ../shared/data/Task04_Hippocampus -w bench`: of the 220
labeled cases, 40 test cases set aside with seed 0, 10 validation cases, 170 training cases in the pool; plans
`nnUNetPlans_bs2` (batch size 2), 3d_fullres, 25 iterations per epoch.

The protocol, per label-subset seed S (which K cases keep their labels): the labeled-only model L
(`labeled_k<K>_s<S>`, 1000 iterations from scratch), then from all of L's weights for N more iterations
(a) labeled-only continued (`labeled_continue_k<K>_s<S>`, nnU-Net's poly learning rate restarted) and (b) BCP stage 2
continued (`bcp_continue_k<K>_s<S>[_<settings>]`, teacher = L). The comparison is (b) − (a), paired per seed and per
test case. Each row of the tables is reproduced by the command shown beside it (`run`, with `-w bench` and `--device`
added; the `protocol` command above a comparison runs all of its rows); the results file
`examples/results/hippocampus_label_scarce.jsonl` keeps every run's Dice per test case and the validation figures of
its final checkpoint (nnU-Net's `fold_0/validation/summary.json`: the 10 validation cases of fold 0, never trained
on), and `python examples/benchmark_label_scarce.py table` rewrites the tables below from it.

**Candidates are chosen on validation, the test split is reported.** A candidate (a BCP knob, `--bcp NAME=VALUE` or
the protocol's `--candidate`) is compared with the default on the first table below — (b) − (a) in validation Dice
per seed, and per validation case over all seeds — or on the unlabeled pool's held-back labels (`pseudo`); never on
the test split. The test split scores each final configuration once, in the paired tables that follow. Rows from
before the runs carried validation figures show "–" there. (a) and (b) are paired only when they started from the
same L (continuation rows record a fingerprint of L's checkpoint; a retrained L keeps its run name).

![Label efficiency](figures/label_efficiency.png)

*Figure* (`python examples/benchmark_label_scarce.py figure --bcp bcp_labeled_loss_weight=1`: BCP in the plugin's
default configuration): mean test Dice against the number of labeled cases. Labeled-only and BCP are the protocol's (a) and (b): L's iterations plus the continuation's, i.e. the same total
iterations for both; the all-labeled ceiling is drawn from rows with that total budget when there are any (its
legend gives the iterations it was trained for). Small markers: single runs (one per seed); large markers: their
mean. Until the protocol's first pair lands, it shows the earlier from-scratch runs instead (one label subset, 1000
iterations for every arm; the BCP points there are its stage-1 variants with α = 0.5).

"""


def write_docs(path: str, text: str) -> None:
    """The tables between the markers of ``path`` (created with its introduction if missing)."""
    maybe_mkdir_p(os.path.dirname(os.path.abspath(path)))
    doc = open(path).read() if isfile(path) else DOCS_INTRO + TABLE_START + "\n" + TABLE_END + "\n"
    head, rest = doc.split(TABLE_START)
    open(path, "w").write(head + TABLE_START + "\n" + text + "\n" + TABLE_END + rest.split(TABLE_END)[1])


def table(args):
    rows = load_rows(args.results)
    seeded = [r for r in rows if "run" in r]
    earlier = [r for r in rows if "run" not in r]
    groups = comparisons(seeded)
    parts = ["### Choosing between candidates: nnU-Net's validation Dice (fold 0's validation cases, never trained "
             "on)", candidates_table(groups) if groups else "No paired runs yet.",
             "### Paired comparison on the test split: BCP vs labeled-only, both continued from L"]
    parts += [comparison_table(g) for g in groups] or ["No paired runs yet."]
    scratch = from_scratch_comparisons(seeded)
    if scratch:
        parts += ["### From scratch at the same iterations: BCP (e.g. the one command) against nnU-Net"]
        parts += [from_scratch_table(g) for g in scratch]
    parts += ["### Every run", runs_table(seeded) if seeded else "No runs yet."]
    if earlier:
        parts += ["### Earlier, from scratch (one label subset, seed 0; run names without the seed)",
                  earlier_table(earlier)]
    text = "\n\n".join(parts)
    write_docs(args.docs, text)
    print(text)


def figure_series(rows: list, settings: dict, budget: int = None):
    """(labeled-only rows, BCP rows, ceiling rows, total iterations, title) of the figure: the protocol's (a) and (b)
    pairs at one total budget (``budget``, default the most common); without protocol rows yet, the earlier from-scratch
    runs (one label subset, BCP with α = 0.5)."""
    seeded = [r for r in rows if "run" in r and r["test_set"] == "split"]
    # the (a) and (b) of paired runs only: a seed whose (b) has not landed would pull labeled-only's mean elsewhere
    continued = [pair[arm] for group in comparisons(seeded) if group["settings"] == settings
                 for pair in group["pairs"] for arm in "ab"]
    if continued:
        totals = [r["from_iterations"] + r["iterations"] for r in continued]
        budget = budget or max(set(totals), key=totals.count)
        continued = [r for r, total in zip(continued, totals) if total == budget]
        return ([r for r in continued if r["arm"] == "labeled_continue"],
                [r for r in continued if r["arm"] == "bcp_continue"],
                list({r["run"]: r for r in seeded if r["arm"] == "ceiling"}.values()), budget,  # latest of a run
                "labeled model L, then continued: labeled-only or BCP")
    earlier = [r for r in rows if "run" not in r and r["iterations"] == (budget or DEFAULT_ITERATIONS)]
    if not earlier:
        raise SystemExit("no rows to plot")
    return ([r for r in earlier if r["arm"] == "labeled"],
            [r for r in earlier if r["arm"] == "bcp" and r.get("bcp_alpha", 0.5) == 0.5],
            [r for r in earlier if r["arm"] == "ceiling"], budget or DEFAULT_ITERATIONS,
            "earlier runs from scratch, label-subset seed 0")


def figure(args):
    """Mean test Dice against the number of labeled cases: labeled-only (a), BCP (b) and the all-labeled ceiling at
    the same total budget, single runs and the mean per number of labeled cases."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = parse_settings(args.bcp)
    labeled, bcp, ceiling, budget, title = figure_series(load_rows(args.results), settings, args.budget)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arm_rows, label, color in ((labeled, "labeled only (nnU-Net)", "tab:blue"),
                                   (bcp, "BCP" + settings_suffix(settings).replace("_", " "), "tab:orange")):
        ks = sorted({r["k"] for r in arm_rows})
        ax.scatter([r["k"] for r in arm_rows], [r["dice_mean"] for r in arm_rows], s=14, color=color, alpha=0.5)
        ax.plot(ks, [np.mean([r["dice_mean"] for r in arm_rows if r["k"] == k]) for k in ks], "o-", color=color,
                label=label)
    shown = [r for r in ceiling if r["iterations"] == budget] or ceiling  # else: the ceiling runs there are
    for r in shown:
        ax.axhline(r["dice_mean"], color="gray", ls="--", lw=1)
    if shown:
        iterations = "/".join(str(i) for i in sorted({r["iterations"] for r in shown}))
        ax.plot([], [], "--", color="gray", label=f"all {shown[0]['k']} labeled ({iterations} iterations)")
    ks = sorted({r["k"] for r in labeled + bcp})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("labeled cases")
    ax.set_ylabel("mean test Dice (40 test cases)")
    ax.set_title(f"MSD Hippocampus, {budget} iterations in all\n{title}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    maybe_mkdir_p(os.path.dirname(os.path.abspath(args.figure)))
    fig.savefig(args.figure, dpi=120)
    print(f"written {args.figure} ({budget} iterations in all: {title})")


def curves(args):
    """Per-epoch figures of one run from its training log (the last training in ``<work>/<run>.log``): validation
    pseudo Dice per class and, in BCP's stage 2, the teacher's pseudo-label foreground fraction per class and the
    student-teacher agreement on unlabeled-origin voxels."""
    import re
    lines = open(join(args.work_dir, f"{args.run}.log")).read().splitlines()
    starts = [i for i, line in enumerate(lines) if re.search(r"\bEpoch 0$", line)]
    rows, epoch = {}, None
    for line in lines[starts[-1]:]:
        if m := re.search(r"\bEpoch (\d+)$", line):
            epoch = int(m.group(1))
            rows[epoch] = {"stage": ""}
        elif m := re.search(r"BCP stage (\d)$", line):
            rows[epoch]["stage"] = m.group(1)
        elif m := re.search(r"Pseudo dice \[(.*)\]", line):
            rows[epoch]["dice"] = [float(v) for v in re.findall(r"\(([^()]+)\)", m.group(1))]
        elif m := re.search(r"foreground fraction per class \[(.*)\]; student-teacher agreement on unlabeled voxels "
                            r"([\d.]+)", line):
            rows[epoch]["pseudo_fg"] = [float(v) for v in m.group(1).split(",")]
            rows[epoch]["agreement"] = float(m.group(2))
            if m := re.search(r"foreground fraction in the labeled patches \[(.*)\]", line):  # absent from older logs
                rows[epoch]["labeled_fg"] = [float(v) for v in m.group(1).split(",")]
    print("epoch | stage | val pseudo Dice per class | teacher pseudo-label foreground per class | agreement | "
          "labeled-patch foreground per class")
    for e, r in sorted(rows.items()):
        print(f"{e:5d} | {r['stage']:5s} | {r.get('dice', '')} | {r.get('pseudo_fg', '')} | {r.get('agreement', '')} | "
              f"{r.get('labeled_fg', '')}")


def pseudo(args):
    """How good are BCP's pseudo-labels? The benchmark's unlabeled cases have labels that training never reads: score
    a kept BCP run's EMA teacher and student on them, or a labeled-only run's model for reference
    (nnUNetv2_predict_from_modelfolder without test-time mirroring, as the teacher labels patches in training), before
    and after the largest-component filter BCP applies."""
    import tempfile
    import SimpleITK as sitk
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2_bcp.bcp import keep_largest_component
    from nnunetv2_bcp.unlabeled.label_subset import choose_label_subset
    env = environment(args.work_dir)
    folder = dataset_folder(env)
    pre = join(env["nnUNet_preprocessed"], os.path.basename(folder))
    splits = load_json(join(pre, "splits_final.json"))
    model = join(args.work_dir, "models", args.run)
    named = parse_run_name(args.run)
    seed = args.seed if named["seed"] is None else named["seed"]  # earlier names (bcp_k4) carry no seed
    subset = choose_label_subset(splits[0]["train"], splits, num_labeled=named["k"], seed=seed)
    cases = subset["folds"]["0"]["unlabeled"]
    cases = sorted(cases)[:args.num_cases]
    ending = load_json(join(folder, "dataset.json"))["file_ending"]
    images = tempfile.mkdtemp(dir=args.work_dir)
    for case in cases:
        os.symlink(join(folder, "imagesTr", f"{case}_0000{ending}"), join(images, f"{case}_0000{ending}"))
    labels = join(folder, "labelsTr")
    result = {"run": args.run, "num_cases": len(cases), "seed": seed, "device": args.device,
              "date": time.strftime("%Y-%m-%d")}
    # a BCP run: its teacher and student; any other run (e.g. labeled_k4): its model, as the reference
    bcp_run = isfile(join(model, "fold_0", "bcp_settings.json"))
    for which in ("teacher", "student") if bcp_run else ("model",):
        exported = join(args.work_dir, f"export_{args.run}_{which}") if bcp_run else model
        if bcp_run:
            shutil.rmtree(exported, ignore_errors=True)
            sh(["nnUNetv2_bcp_export", "-i", model, "-o", exported, "-f", "0"] + (["--teacher"] if which == "teacher"
                                                                                   else []), env)
        pred = join(args.work_dir, f"pseudo_{args.run}_{which}")
        shutil.rmtree(pred, ignore_errors=True)
        sh(["nnUNetv2_predict_from_modelfolder", "-i", images, "-o", pred, "-m", exported, "-f", "0",
            "--disable_tta", "-device", args.device, "-npp", "1", "-nps", "1"], env)
        filtered = pred + "_largest_component"
        maybe_mkdir_p(filtered)
        for case in cases:
            image = sitk.ReadImage(join(pred, case + ending))
            seg = torch.from_numpy(sitk.GetArrayFromImage(image).astype("int64"))[None, None]
            kept = sitk.GetImageFromArray(keep_largest_component(seg)[0, 0].numpy().astype("uint8"))
            kept.CopyInformation(image)
            sitk.WriteImage(kept, join(filtered, case + ending))
        for name, out in ((which, pred), (which + "_largest_component", filtered)):
            metrics = compute_metrics_on_folder(labels, out, join(out, "summary.json"), SimpleITKIO(), ending,
                                                [1, 2], num_processes=2)
            result[name] = {"dice_per_class": {str(c): round(metrics["mean"][c]["Dice"], 4) for c in (1, 2)},
                            "dice_mean": round(metrics["foreground_mean"]["Dice"], 4)}
    shutil.rmtree(images)
    print(json.dumps(result, indent=1))
    with open(PSEUDO_RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--msd", required=True)
    p.add_argument("--num-test", type=int, default=40)
    p.add_argument("--reader", default=None,
                   help="e.g. NibabelIO: written into dataset.json as overwrite_image_reader_writer (where "
                        "SimpleITK is missing)")
    r = sub.add_parser("run", help="one arm")
    r.add_argument("--arm", choices=list(ARM_TRAINERS), required=True)
    r.add_argument("--from", dest="from_run", default=None,
                   help="continuation arms: the kept run to start from (default: the seed's labeled_k<K>_s<S>, "
                        "trained first if missing)")
    r.add_argument("--bcp-pretrain-epochs", type=int, default=None,
                   help="bcp arm: stage-1 epochs (default: the paper's fifth of the epochs; --plugin-defaults: half)")
    r.add_argument("--bcp-alpha", type=float, default=None,
                   help="bcp arms: weight of the unlabeled-origin loss (default: nnUNetTrainerBCP's 0.5)")
    r.add_argument("--plugin-defaults", action="store_true",
                   help="bcp arms: train the plugin's defaults (PLUGIN_DEFAULTS, from scratch also "
                        "PLUGIN_STAGE_DEFAULTS), written out in the run name and row; --bcp on top")
    o = sub.add_parser("protocol", help="L per seed if missing, then (a) and (b) continued from it")
    o.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    o.add_argument("--jobs", type=int, default=1, help="runs at once")
    o.add_argument("--redo", action="store_true", help="run (a) and (b) again even where their models are kept")
    o.add_argument("--arms", nargs="+", default=["labeled_continue", "bcp_continue"],
                   choices=["labeled_continue", "bcp_continue"], help="continuation arms to run (default both)")
    o.add_argument("--candidate", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                   help="a candidate: BCP continued with these settings on every seed, after (a) and (b) of every "
                        "seed; repeatable (in order of priority)")
    o.add_argument("--no-start-after", type=float, default=None, metavar="SECONDS",
                   help="start no run later than this after the protocol began (those are reported as not started)")
    o.add_argument("--dry-run", action="store_true", help="print the runs in the order they would start")
    for q in (r, o):
        q.add_argument("-k", type=int, default=2, help="labeled cases (all but the ceiling arm)")
        q.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                       help="training iterations (continuation arms: N, on top of L's)")
        q.add_argument("--from-iterations", type=int, default=DEFAULT_ITERATIONS,
                       help="iterations of the labeled-only model L that continuations start from")
        q.add_argument("--iterations-per-epoch", type=int, default=DEFAULT_ITERATIONS_PER_EPOCH)
        q.add_argument("--device", default="cpu")
        q.add_argument("--test-images", default=None)
        q.add_argument("--test-labels", default=None)
    t = sub.add_parser("table", aliases=["compare"], help=f"the tables into --docs (between {TABLE_START} and "
                                                          f"{TABLE_END})")
    t.add_argument("--docs", default=DOCS)
    f = sub.add_parser("figure")
    f.add_argument("--figure", default=FIGURE)
    f.add_argument("--budget", type=int, default=None,
                   help="total iterations (L + continuation) of the points (default: the most common)")
    for q in (r, o, f):
        q.add_argument("--bcp", action="append", default=[], metavar="NAME=VALUE",
                       help="a BCP trainer attribute (value as JSON), repeatable; recorded in the run name and row")
    c = sub.add_parser("curves")
    c.add_argument("--run", required=True, help="a run name, e.g. bcp_continue_k2_s0 (its log in the work dir)")
    u = sub.add_parser("pseudo")
    u.add_argument("--run", required=True, help="a kept run, e.g. bcp_continue_k2_s0 or labeled_k2_s0 (its model in "
                                                "<work>/models)")
    u.add_argument("--device", default="cpu")
    u.add_argument("--num-cases", type=int, default=60, help="score the first N unlabeled cases (sorted)")
    for q in (p, r, o, t, f, c, u):
        q.add_argument("-w", "--work-dir", default="bench_hippocampus")
        q.add_argument("--seed", type=int, default=0, help="prepare: the test split; run: the label subset; pseudo: "
                                                           "the label subset of run names without a seed")
        q.add_argument("--results", default=RESULTS)
    return parser


def main():
    args = command_line().parse_args()
    args.work_dir = os.path.abspath(args.work_dir)
    {"prepare": prepare, "run": run, "protocol": protocol, "table": table, "compare": table, "figure": figure,
     "curves": curves, "pseudo": pseudo}[args.command](args)


if __name__ == "__main__":
    main()
