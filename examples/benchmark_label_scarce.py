"""Label-scarce benchmark on real MRI: nnU-Net on K labeled cases vs BCP on K labeled + the rest unlabeled, and the
all-labeled ceiling, with the same configuration, batch size and iteration budget.

    # once: convert the MSD task, set a seeded test split aside, plan and preprocess, add a batch-size-2 plans variant
    python examples/benchmark_label_scarce.py prepare --msd ../shared/data/Task04_Hippocampus -w bench
    # each arm on its own (appends one line to the results file)
    python examples/benchmark_label_scarce.py run -w bench --arm labeled -k 2
    python examples/benchmark_label_scarce.py run -w bench --arm bcp -k 2
    python examples/benchmark_label_scarce.py run -w bench --arm ceiling
    # the README table from the results file
    python examples/benchmark_label_scarce.py table
    # per-epoch validation Dice and BCP pseudo-label figures of one run, from its log
    python examples/benchmark_label_scarce.py curves -w bench --run bcp_k2
    # teacher and student of a kept BCP run scored on the unlabeled cases (their held-back labels); a labeled run's
    # model on the same cases for reference
    python examples/benchmark_label_scarce.py pseudo -w bench --run bcp_k4
    python examples/benchmark_label_scarce.py pseudo -w bench --run labeled_k4

Arms: ``labeled`` = nnUNetTrainerLabelSubset (plain nnU-Net on the K cases of the label subset), ``bcp`` =
nnUNetTrainerBCP (the same K cases labeled, the pool's other cases unlabeled through ``bcp_label_subset.json``),
``ceiling`` = nnUNetTrainer on every pool case. All: ``3d_fullres``, plans ``nnUNetPlans_bs2`` (nnU-Net's plans with
batch size 2), ``--iterations`` iterations (default 1000 = 40 epochs x 25), fold 0 of a split whose validation cases
(10) are never trained on, test cases never used in training. Dice by nnU-Net's evaluation of nnUNetv2_predict's
output on the test split (``--test-images/--test-labels`` to use another labeled folder).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p, save_json

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = join(HERE, "results", "hippocampus_label_scarce.jsonl")
PSEUDO_RESULTS = join(HERE, "results", "hippocampus_pseudo_label_quality.jsonl")
README = join(HERE, os.pardir, "README.md")
TABLE_START, TABLE_END = "<!-- label-scarce-table:start -->", "<!-- label-scarce-table:end -->"
DATASET_ID = 604
PLANS = "nnUNetPlans_bs2"
TRAINERS = '''
import os
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_bcp.training.nnUNetTrainerBCP import default_pretrain_epochs, nnUNetTrainerBCP, nnUNetTrainerLabelSubset


def _schedule(t):
    t.num_epochs = int(os.environ["BENCH_EPOCHS"])
    t.num_iterations_per_epoch = int(os.environ["BENCH_ITERATIONS"])
    t.num_val_iterations_per_epoch = 5


class BenchLabeled(nnUNetTrainerLabelSubset):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _schedule(self)


class BenchBCP(nnUNetTrainerBCP):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _schedule(self)
        self.bcp_pretrain_epochs = int(os.environ.get("BENCH_BCP_PRETRAIN_EPOCHS",
                                                      default_pretrain_epochs(self.num_epochs)))
        self.bcp_alpha = float(os.environ.get("BENCH_BCP_ALPHA", self.bcp_alpha))


class BenchCeiling(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _schedule(self)
'''
ARM_TRAINERS = {"labeled": "BenchLabeled", "bcp": "BenchBCP", "ceiling": "BenchCeiling"}


def environment(work: str) -> dict:
    import nnunetv2_bcp
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = join(work, name)
        maybe_mkdir_p(env[name])
    maybe_mkdir_p(join(work, "ext"))
    with open(join(work, "ext", "bcp_benchmark_trainers.py"), "w") as f:
        f.write(TRAINERS)
    env["nnUNet_extTrainer"] = os.pathsep.join([nnunetv2_bcp.ext_trainer_dir(), join(work, "ext")])
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("nnUNet_n_proc_DA", "2")
    env.setdefault("nnUNet_compile", "f")
    return env


def sh(cmd, env, log=None):
    print("$ " + " ".join(cmd), flush=True)
    exe = join(os.path.dirname(sys.executable), cmd[0])
    with open(log, "a") if log else open(os.devnull, "w") as out:
        subprocess.run([exe if os.path.isfile(exe) else cmd[0], *cmd[1:]], env=env, check=True,
                       stdout=out if log else None, stderr=subprocess.STDOUT if log else None)


def dataset_folder(env) -> str:
    return [join(env["nnUNet_raw"], d) for d in os.listdir(env["nnUNet_raw"]) if d.startswith(f"Dataset{DATASET_ID}_")][0]


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


def run(args):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2_bcp.training.nnUNetTrainerBCP import default_pretrain_epochs
    from nnunetv2_bcp.unlabeled.label_subset import LABEL_SUBSET_FILE, choose_label_subset
    env = environment(args.work_dir)
    folder = dataset_folder(env)
    pre = join(env["nnUNet_preprocessed"], os.path.basename(folder))
    splits = load_json(join(pre, "splits_final.json"))
    train = splits[0]["train"]
    subset_file = join(pre, LABEL_SUBSET_FILE)
    if args.arm == "ceiling":
        if isfile(subset_file):
            os.remove(subset_file)
        k = len(train)
    else:
        k = args.k
        save_json(choose_label_subset(train, splits, num_labeled=k, seed=args.seed), subset_file)
    epochs = args.iterations // args.iterations_per_epoch
    env.update(BENCH_EPOCHS=str(epochs), BENCH_ITERATIONS=str(args.iterations_per_epoch))
    trainer = ARM_TRAINERS[args.arm]
    run_name = f"{args.arm}_k{k}"
    pretrain_epochs = None
    if args.arm == "bcp":
        pretrain_epochs = default_pretrain_epochs(epochs) if args.bcp_pretrain_epochs is None \
            else args.bcp_pretrain_epochs
        env["BENCH_BCP_PRETRAIN_EPOCHS"] = str(pretrain_epochs)
        if args.bcp_pretrain_epochs is not None:
            run_name += f"_pretrain{pretrain_epochs}"
        if args.bcp_alpha is not None:
            env["BENCH_BCP_ALPHA"] = str(args.bcp_alpha)
            run_name += f"_alpha{args.bcp_alpha:g}"
    log = join(args.work_dir, f"{run_name}.log")
    results_folder = join(env["nnUNet_results"], os.path.basename(folder), f"{trainer}__{PLANS}__3d_fullres")
    shutil.rmtree(results_folder, ignore_errors=True)  # each arm from scratch
    start = time.time()
    sh(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-p", PLANS, "-tr", trainer, "-device", args.device],
       env, log)
    train_seconds = time.time() - start
    test_images = args.test_images or join(folder, "imagesTs")
    test_labels = args.test_labels or join(folder, "labelsTs")
    pred = join(args.work_dir, f"pred_{run_name}")
    shutil.rmtree(pred, ignore_errors=True)
    sh(["nnUNetv2_predict", "-i", test_images, "-o", pred, "-d", str(DATASET_ID), "-c", "3d_fullres", "-p", PLANS,
        "-f", "0", "-tr", trainer, "-device", args.device, "-npp", "1", "-nps", "1"], env, log)
    metrics = compute_metrics_on_folder(test_labels, pred, join(pred, "summary.json"), SimpleITKIO(),
                                        load_json(join(folder, "dataset.json"))["file_ending"], [1, 2],
                                        num_processes=2)
    result = {"arm": args.arm, "k": k, "dice_per_class": {str(c): metrics["mean"][c]["Dice"] for c in (1, 2)},
              "dice_mean": metrics["foreground_mean"]["Dice"], "iterations": epochs * args.iterations_per_epoch,
              "train_seconds": round(train_seconds), "seed": args.seed, "device": args.device,
              "num_test": len(os.listdir(test_labels)), "trainer": trainer, "plans": PLANS,
              "date": time.strftime("%Y-%m-%d")}
    if pretrain_epochs is not None:
        result["bcp_pretrain_epochs"] = pretrain_epochs
        settings = load_json(join(results_folder, "fold_0", "bcp_settings.json"))
        result["bcp_alpha"] = settings["bcp_alpha"]
        if "bcp_pretrain_min_dice" in settings:  # stage 1 may go on while the student misses a class
            result["bcp_pretrain_min_dice"] = settings["bcp_pretrain_min_dice"]
            progress = load_json(join(results_folder, "fold_0", "bcp_progress.json"))
            result["bcp_stage1_epochs"] = progress[0]["epoch"] if progress else epochs
    # keep the trained model of every run (the next run of the same arm starts from scratch in nnUNet_results)
    kept = join(args.work_dir, "models", run_name)
    maybe_mkdir_p(os.path.dirname(kept))
    shutil.rmtree(kept, ignore_errors=True)
    shutil.move(results_folder, kept)
    result["model_folder"] = os.path.relpath(kept, args.work_dir)
    maybe_mkdir_p(os.path.dirname(args.results))
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))


def table(args):
    rows = [json.loads(line) for line in open(args.results)] if isfile(args.results) else []
    lines = ["| arm | labeled cases | Dice anterior | Dice posterior | mean Dice | iterations | train time | seed |",
             "|---|---|---|---|---|---|---|---|"]
    order = {"labeled": 0, "bcp": 1, "ceiling": 2}
    for r in sorted(rows, key=lambda r: (r["k"], order[r["arm"]])):
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
    text = "\n".join(lines)
    readme = open(README).read()
    if TABLE_START in readme:
        head, rest = readme.split(TABLE_START)
        readme = head + TABLE_START + "\n" + text + "\n" + TABLE_END + rest.split(TABLE_END)[1]
        open(README, "w").write(readme)
    print(text)


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
    k = int(args.run.split("_k")[1].split("_")[0])
    cases = choose_label_subset(splits[0]["train"], splits, num_labeled=k, seed=args.seed)["folds"]["0"]["unlabeled"]
    cases = sorted(cases)[:args.num_cases]
    ending = load_json(join(folder, "dataset.json"))["file_ending"]
    images = tempfile.mkdtemp(dir=args.work_dir)
    for case in cases:
        os.symlink(join(folder, "imagesTr", f"{case}_0000{ending}"), join(images, f"{case}_0000{ending}"))
    labels = join(folder, "labelsTr")
    result = {"run": args.run, "num_cases": len(cases), "seed": args.seed, "device": args.device,
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--msd", required=True)
    p.add_argument("--num-test", type=int, default=40)
    r = sub.add_parser("run")
    r.add_argument("--arm", choices=list(ARM_TRAINERS), required=True)
    r.add_argument("-k", type=int, default=2, help="labeled cases (labeled and bcp arms)")
    r.add_argument("--iterations", type=int, default=1000)
    r.add_argument("--iterations-per-epoch", type=int, default=25)
    r.add_argument("--device", default="cpu")
    r.add_argument("--bcp-pretrain-epochs", type=int, default=None,
                   help="bcp arm: stage-1 epochs (default: nnUNetTrainerBCP's 20%% of the epochs)")
    r.add_argument("--bcp-alpha", type=float, default=None,
                   help="bcp arm: weight of the unlabeled-origin loss (default: nnUNetTrainerBCP's 0.5)")
    r.add_argument("--test-images", default=None)
    r.add_argument("--test-labels", default=None)
    t = sub.add_parser("table")
    c = sub.add_parser("curves")
    c.add_argument("--run", required=True, help="a run name, e.g. bcp_k2 or labeled_k4 (its log in the work dir)")
    u = sub.add_parser("pseudo")
    u.add_argument("--run", required=True, help="a kept run, e.g. bcp_k4 or labeled_k4 (its model in <work>/models)")
    u.add_argument("--device", default="cpu")
    u.add_argument("--num-cases", type=int, default=60, help="score the first N unlabeled cases (sorted)")
    for q in (p, r, t, c, u):
        q.add_argument("-w", "--work-dir", default="bench_hippocampus")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    args.work_dir = os.path.abspath(args.work_dir)
    {"prepare": prepare, "run": run, "table": table, "curves": curves, "pseudo": pseudo}[args.command](args)


if __name__ == "__main__":
    main()
