"""The examples' logic on tiny fake data: the ACDC recipe's conversion, the label-scarce benchmark's run names,
per-run folders, paired statistics, tables, figure and protocol (nnU-Net faked; no real training)."""
import argparse
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json, save_json

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_acdc(root, num_patients=10):
    rng = np.random.default_rng(0)
    for p in range(1, num_patients + 1):
        folder = join(root, f"patient{p:03d}")
        os.makedirs(folder)
        for frame in (1, 12):
            case = join(folder, f"patient{p:03d}_frame{frame:02d}")
            sitk.WriteImage(sitk.GetImageFromArray(rng.random((4, 8, 8)).astype(np.float32)), case + ".nii.gz")
            sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 4, (4, 8, 8)).astype(np.uint8)), case + "_gt.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 8, 8), np.float32)),
                        join(folder, f"patient{p:03d}_4d.nii.gz"))  # not a labeled frame: ignored


def test_acdc_conversion_split_and_label_subset(tmp_path):
    acdc = _load("acdc_recipe")
    _fake_acdc(str(tmp_path / "training"))
    folder = acdc.convert(str(tmp_path / "training"), str(tmp_path / "raw"), 27, seed=0)
    split = load_json(join(folder, "acdc_split.json"))
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (7, 1, 2)
    assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])
    images_tr = sorted(os.listdir(join(folder, "imagesTr")))
    assert len(images_tr) == 16 and len(os.listdir(join(folder, "labelsTs"))) == 4
    assert all(f.endswith("_0000.nii.gz") for f in images_tr)
    assert not any(p in f for p in split["test"] for f in images_tr)  # test patients never in training
    dataset_json = load_json(join(folder, "dataset.json"))
    assert dataset_json["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert dataset_json["numTraining"] == 16

    pre = tmp_path / "pre"
    pre.mkdir()
    subset = acdc.write_split_and_subset(folder, str(pre), labeled_patients=3, seed=0)
    splits = load_json(str(pre / "splits_final.json"))
    assert len(splits[0]["train"]) == 14 and len(splits[0]["val"]) == 2
    labeled = subset["folds"]["0"]["labeled"]
    assert len(subset["labeled_patients"]) == 3 and len(labeled) == 6  # both frames of each labeled patient
    assert {c.split("_")[0] for c in labeled} == set(subset["labeled_patients"]) <= set(split["train"])
    assert sorted(labeled + subset["folds"]["0"]["unlabeled"]) == sorted(splits[0]["train"])
    assert "all" not in subset["folds"]


# ------------------------------------------------------------------------------------ label-scarce benchmark
def _fake_benchmark_work(work, num_train=8):
    """A work dir as ``prepare`` leaves it, with tiny test labels and a stale dataset-level label subset."""
    raw = join(work, "nnUNet_raw", "Dataset604_Fake")
    pre = join(work, "nnUNet_preprocessed", "Dataset604_Fake")
    for folder in (join(raw, "imagesTs"), join(raw, "labelsTs"), join(pre, "nnUNetPlans_3d_fullres"),
                   join(pre, "nnUNetPlans_3d_fullres_unlabeled")):
        os.makedirs(folder)
    save_json({"labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz", "channel_names": {"0": "MRI"},
               "numTraining": num_train}, join(raw, "dataset.json"))
    rng = np.random.default_rng(0)
    for i in range(3):
        seg = rng.integers(0, 3, (4, 6, 6)).astype(np.uint8)
        seg[0, 0, :3], seg[0, 1, :3] = 1, 2  # both classes in every case
        sitk.WriteImage(sitk.GetImageFromArray(seg), join(raw, "labelsTs", f"case{i}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(seg.astype(np.float32)), join(raw, "imagesTs", f"case{i}_0000.nii.gz"))
    train = [f"tr{i}" for i in range(num_train)]
    save_json([{"train": train, "val": ["va0", "va1"]}], join(pre, "splits_final.json"))
    save_json({"plans_name": "nnUNetPlans_bs2"}, join(pre, "nnUNetPlans_bs2.json"))
    save_json({"folds": {"0": {"labeled": train[:1], "unlabeled": train[1:]}}}, join(pre, "bcp_label_subset.json"))
    open(join(pre, ".nnUNetPlans_3d_fullres_unlabeled.lock"), "w").close()
    return raw, pre


def test_benchmark_run_names_and_settings():
    bench = _load("benchmark_label_scarce")
    assert bench.run_name("labeled", 2, 0) == "labeled_k2_s0" != bench.run_name("labeled", 2, 1)
    assert bench.run_name("labeled_continue", 2, 1, from_run="labeled_k2_s1") == "labeled_continue_k2_s1"
    settings = bench.parse_settings(["bcp_teacher_weak_view=true", "bcp_labeled_loss_weight=1.0", "name=abc"])
    assert settings == {"bcp_teacher_weak_view": True, "bcp_labeled_loss_weight": 1.0, "name": "abc"}
    assert bench.run_name("bcp_continue", 4, 2, 2000, settings, from_run="labeled_k4_s2_it500") == \
        "bcp_continue_k4_s2_it2000_from-labeled_k4_s2_it500_labeled_loss_weight=1.0_teacher_weak_view=true_name=abc"
    with pytest.raises(SystemExit):
        bench.parse_settings(["bcp_alpha"])
    assert bench.parse_run_name("bcp_continue_k2_s1_alpha=0.3") == {"k": 2, "seed": 1}
    assert bench.parse_run_name("bcp_k4_pretrain8") == {"k": 4, "seed": None}  # earlier names: no seed


def test_benchmark_runs_are_isolated_per_seed(tmp_path):
    bench = _load("benchmark_label_scarce")
    from nnunetv2_bcp.unlabeled.label_subset import label_subset_path
    _, shared = _fake_benchmark_work(str(tmp_path))
    subsets = {s: {"folds": {"0": {"labeled": [f"tr{s}"], "unlabeled": []}}} for s in (0, 1)}
    envs = {s: bench.run_environment(str(tmp_path), bench.run_name("labeled", 1, s), subsets[s]) for s in (0, 1)}
    (env0, own0), (env1, own1) = envs[0], envs[1]
    assert env0["nnUNet_results"] != env1["nnUNet_results"] and own0 != own1
    assert env0["nnUNet_raw"] == env1["nnUNet_raw"] == str(tmp_path / "nnUNet_raw")
    for s, own in ((0, own0), (1, own1)):
        assert os.path.dirname(own) == envs[s][0]["nnUNet_preprocessed"]
        assert load_json(label_subset_path(own)) == subsets[s]  # its own subset, not the stale shared one
        assert os.path.realpath(join(own, "nnUNetPlans_3d_fullres")) == join(shared, "nnUNetPlans_3d_fullres")
        assert load_json(join(own, "splits_final.json"))[0]["val"] == ["va0", "va1"]
        # BCP's unlabeled copy and its lock stay per run (the plugin rewrites the copy to match the run's subset)
        assert not os.path.exists(join(own, "nnUNetPlans_3d_fullres_unlabeled"))
        assert not os.path.exists(join(own, ".nnUNetPlans_3d_fullres_unlabeled.lock"))
    ceiling_env, ceiling_own = bench.run_environment(str(tmp_path), "ceiling_k8_s0", None)
    assert not os.path.exists(label_subset_path(ceiling_own))


def test_benchmark_paired_statistics():
    bench = _load("benchmark_label_scarce")
    rng = np.random.default_rng(1)
    a = {f"c{i}": v for i, v in enumerate(rng.uniform(0.7, 0.9, 40))}
    b = {c: v + 0.02 + rng.normal(0, 0.01) for c, v in a.items()}
    shifted = bench.paired_statistics(a, b)
    assert shifted["n"] == 40 and abs(shifted["mean"] - 0.02) < 0.005
    assert 0 < shifted["ci"][0] < shifted["mean"] < shifted["ci"][1] and shifted["p"] < 1e-6
    worse = bench.paired_statistics(b, a)
    assert worse["ci"][1] < 0 and worse["better"] < 5
    same = bench.paired_statistics(a, dict(a))
    assert same["mean"] == 0 and same["ci"] == (0, 0) and same["p"] == 1 and same["better"] == 0
    assert bench.paired_statistics(a, {"c0": a["c0"] + 1, "other": 0.5})["n"] == 1  # only cases both arms have


def test_benchmark_paired_statistics_resample_whole_clusters_of_dependent_cases():
    """Two frames of one patient are not two independent volumes: the interval resamples patients and the
    Wilcoxon test runs on their mean differences, so a patient's frames that agree narrow nothing."""
    bench = _load("benchmark_label_scarce")
    rng = np.random.default_rng(2)
    a, b = {}, {}
    for patient in range(10):
        shift = 0.02 + rng.normal(0, 0.03)
        for frame in (1, 2):
            case = f"patient{patient:03d}_frame0{frame}"
            a[case] = 0.8
            b[case] = 0.8 + shift + rng.normal(0, 0.002)  # the two frames of a patient move together
    volumes = bench.paired_statistics(a, b)
    patients = bench.paired_statistics(a, b, cluster=lambda case: case.split("_frame")[0])
    assert patients["n"] == volumes["n"] == 20 and patients["clusters"] == 10 and "clusters" not in volumes
    assert patients["mean"] == pytest.approx(volumes["mean"]) and patients["better"] == volumes["better"]
    assert patients["ci"][1] - patients["ci"][0] > 1.25 * (volumes["ci"][1] - volumes["ci"][0])
    assert patients["p"] > volumes["p"]


def _fake_row(bench, arm, k, seed, dice, iterations=1000, from_iterations=None, settings=None, validation=None):
    cases = {f"c{i}": {"1": dice + 0.01 * (i % 3), "2": dice - 0.01 * (i % 3)} for i in range(10)}
    from_run = bench.labeled_run_name(k, seed) if from_iterations else None
    row = {"run": bench.run_name(arm, k, seed, iterations, settings, from_run), "arm": arm, "k": k, "seed": seed,
           "from": from_run, "from_iterations": from_iterations, "iterations": iterations, "settings": settings or {},
           "dice_per_class": {"1": dice, "2": dice}, "dice_mean": dice, "dice_per_case": cases,
           "train_seconds": 600, "device": "cpu", "num_test": 10, "test_set": "split", "command": "python ..."}
    if validation is not None:  # rows written since runs carry nnU-Net's validation figures
        row.update(validation_dice_mean=validation, validation_dice_per_class={"1": validation, "2": validation},
                   validation_dice_per_case={f"va{i}": {"1": validation, "2": validation} for i in range(4)},
                   validation_num_cases=4)
    return row


def test_benchmark_table_and_figure_from_results(tmp_path):
    bench = _load("benchmark_label_scarce")
    results, docs, figure = str(tmp_path / "r.jsonl"), str(tmp_path / "docs" / "b.md"), str(tmp_path / "f" / "e.png")
    earlier = {"arm": "bcp", "k": 2, "dice_per_class": {"1": 0.8, "2": 0.8}, "dice_mean": 0.8, "iterations": 1000,
               "train_seconds": 60, "seed": 0, "device": "cpu", "trainer": "BenchBCP", "bcp_pretrain_epochs": 8}
    rows = [earlier, _fake_row(bench, "ceiling", 170, 0, 0.86, iterations=2000)]
    for seed, (a, b) in enumerate(((0.80, 0.83), (0.78, 0.80))):
        rows += [_fake_row(bench, "labeled", 2, seed, 0.77),
                 _fake_row(bench, "labeled_continue", 2, seed, a, 1000, 1000, validation=a - 0.1),
                 _fake_row(bench, "bcp_continue", 2, seed, b, 1000, 1000, validation=b - 0.1 - 0.01 * seed)]
    rows.append(_fake_row(bench, "bcp_continue", 2, 0, 0.5, 1000, 1000, {"bcp_alpha": 0.3}))  # another candidate
    for row in rows:
        bench.append_row(results, row)
    args = argparse.Namespace(results=results, docs=docs, figure=figure, budget=None, bcp=[])
    bench.table(args)
    text = open(docs).read()
    assert text.startswith("# Benchmarks") and text.count(bench.TABLE_START) == 1
    assert "| 0 | 0.8000 | 0.8300 | +0.0300 | +0.0300 [+0.0300, +0.0300] |" in text
    assert "| 1 | 0.7800 | 0.8000 | +0.0200 |" in text and "| mean of 2 | 0.7900 | 0.8150 | +0.0250 |" in text
    assert "`--bcp bcp_alpha=0.3`" in text and "| 0 | 0.8000 | 0.5000 | -0.3000 |" in text
    assert "labeled_k2_s1" in text and "Earlier, from scratch" in text and "stage 1: 8 epochs (fixed)" in text
    # candidates are compared on validation (a table before the test split's, without its figures)
    choose, paired = text.split("### Choosing between candidates")[1].split("### Paired comparison on the test split")
    assert "| 2 | as in the paper | 1000 + 1000 = 2000 | 0: +0.0300, 1: +0.0100 | +0.0200 (2 of 2 pairs) | 0.7100 | " \
           "+0.0200 [+0.0200, +0.0200] | 8 of 8 |" in choose
    # 4 validation cases x 2 seeds: each case's mean over the seeds is +0.0200, and whole cases are resampled
    assert "| 2 | `bcp_alpha=0.3` | 1000 + 1000 = 2000 | 0: – | – | – | – | – |" in choose  # a row without them
    assert "0.8300" not in choose and "| 0 | 0.8000 | 0.8300 |" in paired
    assert "| labeled_continue_k2_s0 | 2 | 0 | labeled_k2_s0 (1000) | 1000 | 0.8000 | 0.8000 | 0.8000 | 0.7000 |" in text
    assert "| labeled_k2_s0 | 2 | 0 | scratch | 1000 | 0.7700 | 0.7700 | 0.7700 | – |" in text
    open(docs, "a").write("\nkept after the table\n")
    bench.append_row(results, _fake_row(bench, "bcp_continue", 2, 1, 0.9, 1000, 1000))  # a later row replaces
    bench.table(args)
    text = open(docs).read()
    assert text.count(bench.TABLE_START) == 1 and text.endswith("kept after the table\n")
    assert "| 1 | 0.7800 | 0.9000 | +0.1200 |" in text and "| 1 | 0.7800 | 0.8000 |" not in text
    assert "| 0: +0.0300, 1: – | +0.0300 (1 of 2 pairs) | 0.7300 |" in text  # the later row has no validation
    labeled, bcp, ceiling, budget, _ = bench.figure_series(bench.load_rows(results), {})
    assert budget == 2000 and [r["dice_mean"] for r in ceiling] == [0.86]
    assert sorted(r["dice_mean"] for r in labeled) == [0.78, 0.80]  # (a), not L
    assert sorted(r["dice_mean"] for r in bcp) == [0.83, 0.9]  # default settings only, a run's latest row
    assert [r["dice_mean"] for r in bench.figure_series(bench.load_rows(results), {"bcp_alpha": 0.3})[1]] == [0.5]
    assert bench.figure_series([earlier], {})[1:4] == ([earlier], [], 1000)  # before any protocol row
    # a seed whose (b) has not landed: its (a) stays out of the figure, which averages paired seeds only
    bench.append_row(results, _fake_row(bench, "labeled_continue", 2, 2, 0.99, 1000, 1000))
    assert sorted(r["dice_mean"] for r in bench.figure_series(bench.load_rows(results), {})[0]) == [0.78, 0.80]
    bench.figure(args)
    with open(figure, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_benchmark_table_pairs_bcp_from_scratch_with_nnunet_at_the_same_iterations(tmp_path):
    """The one command's evidence: BCP from scratch against nnU-Net from scratch of the same seed and iterations, per
    test and validation case, beside the two-command recipe of the same total iterations whose settings it has."""
    bench = _load("benchmark_label_scarce")
    one_command = {"bcp_labeled_loss_weight": 1, "bcp_stage_one": "nnunet"}
    rows = [_fake_row(bench, "labeled", 2, 0, 0.80, 2000, validation=0.70),
            _fake_row(bench, "bcp", 2, 0, 0.83, 2000, settings=one_command, validation=0.73),
            _fake_row(bench, "labeled", 2, 1, 0.78, 2000),
            _fake_row(bench, "bcp", 2, 1, 0.80, 2000, settings=one_command),
            _fake_row(bench, "bcp", 2, 2, 0.90, 2000, settings=one_command),  # no nnU-Net run of its seed
            _fake_row(bench, "bcp_continue", 2, 0, 0.82, 1000, 1000, {"bcp_labeled_loss_weight": 1}),
            _fake_row(bench, "bcp_continue", 2, 0, 0.77, 1000, 1000),  # the paper's loss: fewer of its settings
            _fake_row(bench, "bcp_continue", 2, 1, 0.99, 1000, 1000, {"bcp_alpha": 0.3})]  # not its settings
    results, docs = str(tmp_path / "r.jsonl"), str(tmp_path / "b.md")
    for row in rows:
        bench.append_row(results, row)
    bench.table(argparse.Namespace(results=results, docs=docs))
    text = open(docs).read().split("### From scratch at the same iterations")[1].split("### Every run")[0]
    recipe = bench.run_name("bcp_continue", 2, 0, 1000, {"bcp_labeled_loss_weight": 1}, "labeled_k2_s0")
    assert (f"| 0 | 0.8000 | 0.8300 | +0.0300 | +0.0300 [+0.0300, +0.0300] | 10 of 10 | 0.7000 / 0.7300 | "
            f"+0.0300 [+0.0300, +0.0300], 4 of 4 | 0.8200 (`{recipe}`) | +0.0100 [+0.0100, +0.0100] |") in text
    assert "| 1 | 0.7800 | 0.8000 | +0.0200 | +0.0200 [+0.0200, +0.0200] | 10 of 10 | – | – | – | – |" in text
    assert "| mean of 2 | 0.7900 | 0.8150 | +0.0250 | | | | | 0.8200 (1 of 2 seeds) |  |" in text
    assert "0.9000" not in text and "0.9900" not in text and "0.7700" not in text
    assert "--iterations 2000 --bcp bcp_labeled_loss_weight=1 --bcp bcp_stage_one=\"nnunet\"`" in text


def test_benchmark_pairs_only_runs_from_the_same_labeled_model():
    """A later session retrains L under the same name: its (a) must not be paired with an earlier session's (b), and
    each L's pair stays in the table (on another device, say), with per-device means beside the mean of all."""
    bench = _load("benchmark_label_scarce")
    old_a, old_b = (_fake_row(bench, arm, 2, 0, d, 1000, 1000) for arm, d in (("labeled_continue", 0.80),
                                                                             ("bcp_continue", 0.81)))
    new_a, new_b = (_fake_row(bench, arm, 2, 0, d, 1000, 1000) for arm, d in (("labeled_continue", 0.70),
                                                                             ("bcp_continue", 0.75)))
    old_cand = _fake_row(bench, "bcp_continue", 2, 0, 0.82, 1000, 1000, {"bcp_labeled_loss_weight": 1})
    new_a["from_checkpoint"] = new_b["from_checkpoint"] = "abc"
    new_a["device"] = new_b["device"] = "cuda"
    seed1 = [_fake_row(bench, arm, 2, 1, d, 1000, 1000) for arm, d in (("labeled_continue", 0.60),
                                                                      ("bcp_continue", 0.66))]
    groups = bench.comparisons([old_a, old_b, old_cand, new_a, new_b] + seed1)
    pairs = {json.dumps(g["settings"]): [(p["seed"], p["device"], p["a"]["dice_mean"], p["b"]["dice_mean"])
                                         for p in g["pairs"]] for g in groups}
    assert pairs == {'{"bcp_labeled_loss_weight": 1}': [(0, "cpu", 0.80, 0.82)],
                     "{}": [(0, "cpu", 0.80, 0.81), (0, "cuda", 0.70, 0.75), (1, "cpu", 0.60, 0.66)]}
    text = bench.comparison_table(groups[1])
    assert "| 0 (cpu) | 0.8000 | 0.8100 | +0.0100 |" in text and "| 0 (cuda) | 0.7000 | 0.7500 | +0.0500 |" in text
    assert "| mean of 2 on cpu (seeds 0 1) | 0.7000 | 0.7350 | +0.0350 |" in text
    assert "| mean of 1 on cuda (seeds 0) | 0.7000 | 0.7500 | +0.0500 |" in text
    assert "| mean of all 3 | 0.7000 | 0.7400 | +0.0400 |" in text
    assert "--seeds 0 1 -k 2" in text
    new_a["device"] = new_b["device"] = "cpu"  # two Ls of one seed on one device: told apart by L's fingerprint
    text = bench.comparison_table(bench.comparisons([old_a, old_b, new_a, new_b])[0])
    assert "| 0 L unrecorded | 0.8000 | 0.8100 |" in text and "| 0 L abc | 0.7000 | 0.7500 |" in text
    labeled, bcp = bench.figure_series([old_a, old_b, new_a, new_b] + seed1, {})[:2]
    assert sorted(r["dice_mean"] for r in bcp) == [0.66, 0.75, 0.81]  # both pairs of seed 0 (one run name)


def _fake_nnunet(raw, calls, interrupt_after_epoch=None):
    """A fake ``sh`` for the label-scarce benchmark: records each nnU-Net command, writes what nnUNetv2_train leaves
    (final checkpoint, BCP settings, validation summary) and copies the test labels as predictions.
    ``interrupt_after_epoch``: nnUNetv2_train leaves only a latest checkpoint of that epoch and fails, once."""
    interrupt = [interrupt_after_epoch]

    def fake_sh(cmd, env, log=None):
        option = dict(zip(cmd, cmd[1:]))
        subset = load_json(join(env["nnUNet_preprocessed"], "Dataset604_Fake", "bcp_label_subset.json"))
        calls.append((cmd[0], option.get("-tr"), env["nnUNet_results"], subset["folds"]["0"]["labeled"],
                      env.get("BENCH_CONTINUE"), json.loads(env["BENCH_SETTINGS"]), option.get("-m"), "--c" in cmd))
        results = join(env["nnUNet_results"], "Dataset604_Fake", f"{option.get('-tr')}__nnUNetPlans_bs2__3d_fullres")
        if cmd[0] == "nnUNetv2_bcp_start_from_model":  # the start: L's weights as a latest checkpoint at epoch 0
            os.makedirs(join(results, "fold_0"), exist_ok=True)
            torch.save({"current_epoch": 0, "logging": {}}, join(results, "fold_0", "checkpoint_latest.pth"))
        if cmd[0] == "nnUNetv2_train" and "--c" in cmd:  # nnU-Net would start from random weights without one
            assert any(os.path.isfile(join(results, "fold_0", f"checkpoint_{c}.pth")) for c in ("final", "latest"))
        if cmd[0] == "nnUNetv2_train" and interrupt[0] is not None:
            import subprocess
            os.makedirs(join(results, "fold_0"), exist_ok=True)
            torch.save({"current_epoch": interrupt[0], "logging": {"epoch_start_timestamps": [100.0, 130.0],
                                                                   "epoch_end_timestamps": [125.0, 160.0]}},
                       join(results, "fold_0", "checkpoint_latest.pth"))
            interrupt[0] = None
            raise subprocess.CalledProcessError(-9, cmd)
        if cmd[0] == "nnUNetv2_train":
            assert "--c" in cmd or not env.get("BENCH_CONTINUE")  # a continuation starts from its checkpoint
            os.makedirs(join(results, "fold_0", "validation"), exist_ok=True)
            with open(join(results, "fold_0", "checkpoint_final.pth"), "w") as f:
                f.write(option["-tr"])
            if option["-tr"] == "BenchBCP":
                save_json({"bcp_alpha": 0.3}, join(results, "fold_0", "bcp_settings.json"))
            # what nnU-Net's validation of the final checkpoint writes at the end of training (fold 0's val cases)
            dice = {"va0": (0.6, 0.7), "va1": (0.8, 0.9)} if option["-tr"] == "BenchBCP" else \
                {"va0": (0.5, 0.5), "va1": (0.7, 0.7)}
            save_json({"metric_per_case": [
                {"reference_file": join(env["nnUNet_preprocessed"], "Dataset604_Fake", "gt_segmentations",
                                        f"{case}.nii.gz"), "metrics": {"1": {"Dice": d1, "IoU": 0}, "2": {"Dice": d2}}}
                for case, (d1, d2) in dice.items()],
                "mean": {c: {"Dice": float(np.mean([d[i] for d in dice.values()]))} for i, c in enumerate("12")},
                "foreground_mean": {"Dice": float(np.mean(list(dice.values())))}},
                join(results, "fold_0", "validation", "summary.json"))
        elif cmd[0] == "nnUNetv2_predict":
            shutil.copytree(join(raw, "labelsTs"), option["-o"])
    return fake_sh


def _metrics_in_process(folder_ref, folder_pred, output_file, reader, file_ending, labels, num_processes):
    # nnU-Net's per-case metrics and summary.json, without its process pool (slow to start here)
    from nnunetv2.evaluation.evaluate_predictions import (compute_metrics, recursive_fix_for_json_export,
                                                          save_summary_json)
    per_case = [compute_metrics(join(folder_ref, f), join(folder_pred, f), reader, labels)
                for f in sorted(os.listdir(folder_pred))]
    [recursive_fix_for_json_export(r) for r in per_case]
    means = {c: {"Dice": float(np.mean([r["metrics"][c]["Dice"] for r in per_case]))} for c in labels}
    save_summary_json({"metric_per_case": per_case, "mean": means,
                       "foreground_mean": {"Dice": float(np.mean([m["Dice"] for m in means.values()]))}},
                      output_file)


def test_benchmark_continuation_run_trains_missing_labeled_model_first(tmp_path, monkeypatch):
    """``run --arm bcp_continue`` with a fake nnU-Net: L is trained first, the continuation starts from L's final
    checkpoint in its own folders, and both rows carry the per-case Dice, seed and iterations."""
    bench = _load("benchmark_label_scarce")
    raw, _ = _fake_benchmark_work(str(tmp_path))
    calls = []
    from nnunetv2.evaluation import evaluate_predictions
    monkeypatch.setattr(evaluate_predictions, "compute_metrics_on_folder", _metrics_in_process)
    monkeypatch.setattr(bench, "sh", _fake_nnunet(raw, calls))
    args = argparse.Namespace(work_dir=str(tmp_path), arm="bcp_continue", k=2, seed=1, iterations=500,
                              iterations_per_epoch=25, from_iterations=1000, from_run=None, device="cpu",
                              bcp=["bcp_alpha=0.3"], bcp_alpha=None, bcp_pretrain_epochs=None, test_images=None,
                              test_labels=None, results=str(tmp_path / "r.jsonl"))
    bench.run(args)
    assert [(c[0], c[1]) for c in calls] == [
        ("nnUNetv2_train", "BenchLabeled"), ("nnUNetv2_predict", "BenchLabeled"),
        ("nnUNetv2_bcp_start_from_model", "BenchBCP"), ("nnUNetv2_train", "BenchBCP"), ("nnUNetv2_predict", "BenchBCP")]
    assert calls[0][2] != calls[2][2] and calls[0][3] == calls[2][3] and len(calls[0][3]) == 2  # seed 1's 2 cases
    assert calls[0][4] is None and calls[0][5] == {} and calls[2][4] == "1" and calls[2][5] == {"bcp_alpha": 0.3}
    assert calls[2][6] == join(str(tmp_path), "models", "labeled_k2_s1", "fold_0", "checkpoint_final.pth")
    labeled, continued = bench.load_rows(args.results)
    assert labeled["run"] == "labeled_k2_s1" and labeled["from"] is None and labeled["iterations"] == 1000
    assert continued["run"] == "bcp_continue_k2_s1_it500_alpha=0.3"
    assert (continued["from"], continued["from_iterations"], continued["iterations"]) == ("labeled_k2_s1", 1000, 500)
    assert continued["settings"] == {"bcp_alpha": 0.3} and continued["bcp_settings"] == {"bcp_alpha": 0.3}
    assert continued["dice_per_case"] == {f"case{i}": {"1": 1.0, "2": 1.0} for i in range(3)}
    assert continued["seed"] == 1 and continued["dice_mean"] == 1.0 and "--bcp bcp_alpha=0.3" in continued["command"]
    assert "--iterations-per-epoch" not in continued["command"]  # the default, 25
    # the validation figures of each run's own final checkpoint, beside the test Dice
    assert continued["validation_dice_mean"] == pytest.approx(0.75) and continued["validation_num_cases"] == 2
    assert continued["validation_dice_per_class"] == pytest.approx({"1": 0.7, "2": 0.8})
    assert continued["validation_dice_per_case"] == {"va0": {"1": 0.6, "2": 0.7}, "va1": {"1": 0.8, "2": 0.9}}
    assert labeled["validation_dice_mean"] == pytest.approx(0.6) and "from_checkpoint" not in labeled
    assert continued["from_checkpoint"] == bench.checkpoint_id(
        join(str(tmp_path), "models", "labeled_k2_s1", "fold_0", "checkpoint_final.pth"))
    assert bench.load_rows(args.results)[1] == load_json(join(str(tmp_path), "models", continued["run"], "result.json"))
    assert bench.model_done(str(tmp_path), "labeled_k2_s1") and bench.model_done(str(tmp_path), continued["run"])
    assert not os.path.exists(join(str(tmp_path), "runs", continued["run"]))


def test_benchmark_interrupted_run_resumes_from_its_latest_checkpoint(tmp_path, monkeypatch):
    """A CPU arm outlives a session: the next ``run`` of the same name goes on from its latest checkpoint with
    ``--c`` (not from L again), counts the epochs it had finished and says so in its row; a run started otherwise
    (here: on another device) starts over from L."""
    import subprocess
    bench = _load("benchmark_label_scarce")
    raw, _ = _fake_benchmark_work(str(tmp_path))
    start_model = join(str(tmp_path), "models", "labeled_k2_s1")
    os.makedirs(join(start_model, "fold_0"))
    with open(join(start_model, "fold_0", "checkpoint_final.pth"), "w") as f:
        f.write("L")
    save_json({"iterations": 1000}, join(start_model, "result.json"))
    from nnunetv2.evaluation import evaluate_predictions
    monkeypatch.setattr(evaluate_predictions, "compute_metrics_on_folder", _metrics_in_process)
    args = argparse.Namespace(work_dir=str(tmp_path), arm="bcp_continue", k=2, seed=1, iterations=500,
                              iterations_per_epoch=20, from_iterations=1000, from_run=None, device="cpu",
                              bcp=[], bcp_alpha=None, bcp_pretrain_epochs=None, test_images=None,
                              test_labels=None, results=str(tmp_path / "r.jsonl"))
    calls = []
    monkeypatch.setattr(bench, "sh", _fake_nnunet(raw, calls, interrupt_after_epoch=2))
    with pytest.raises(subprocess.CalledProcessError):
        bench.run(args)
    assert [(c[0], c[7]) for c in calls] == [("nnUNetv2_bcp_start_from_model", False), ("nnUNetv2_train", True)]
    assert bench.load_rows(args.results) == []

    calls.clear()
    row = bench.run(args)
    assert [(c[0], c[7]) for c in calls] == [("nnUNetv2_train", True), ("nnUNetv2_predict", False)]
    assert calls[0][4] == "1"  # still trained as a continuation (no stage 1)
    assert row["resumed_at_epoch"] == 2 and 55 <= row["train_seconds"] < 60  # the two epochs before: 25 + 30 s
    assert row["command"].endswith("--iterations 500 --iterations-per-epoch 20")  # reproduces the 25 epochs
    assert row["environment"]["MALLOC_MMAP_MAX_"] == "0"  # what the run's speed depended on, in its row
    assert bench.load_rows(args.results) == [row] and not os.path.exists(join(str(tmp_path), "runs", row["run"]))

    calls.clear()
    monkeypatch.setattr(bench, "sh", _fake_nnunet(raw, calls, interrupt_after_epoch=3))
    with pytest.raises(subprocess.CalledProcessError):
        bench.run(args)
    calls.clear()
    row = bench.run(argparse.Namespace(**{**vars(args), "device": "cuda"}))
    assert [c[0] for c in calls] == ["nnUNetv2_bcp_start_from_model", "nnUNetv2_train", "nnUNetv2_predict"]
    assert "resumed_at_epoch" not in row

    # a checkpoint cut short by the kill: nothing to resume from, the run starts over
    calls.clear()
    monkeypatch.setattr(bench, "sh", _fake_nnunet(raw, calls, interrupt_after_epoch=4))
    with pytest.raises(subprocess.CalledProcessError):
        bench.run(args)
    checkpoint = join(str(tmp_path), "runs", row["run"], "nnUNet_results", "Dataset604_Fake",
                      "BenchBCP__nnUNetPlans_bs2__3d_fullres", "fold_0", "checkpoint_latest.pth")
    with open(checkpoint, "r+b") as f:
        f.truncate(10)
    calls.clear()
    row = bench.run(args)
    assert [c[0] for c in calls] == ["nnUNetv2_bcp_start_from_model", "nnUNetv2_train", "nnUNetv2_predict"]
    assert "resumed_at_epoch" not in row


def test_benchmark_protocol_schedules_missing_models_then_both_arms(tmp_path, monkeypatch):
    bench = _load("benchmark_label_scarce")
    work = str(tmp_path)
    os.makedirs(join(work, "models", "labeled_k2_s0", "fold_0"))
    open(join(work, "models", "labeled_k2_s0", "fold_0", "checkpoint_final.pth"), "w").close()
    os.makedirs(join(work, "models", "labeled_continue_k2_s0"))
    save_json({}, join(work, "models", "labeled_continue_k2_s0", "result.json"))  # (a) of seed 0 done before
    batches = []
    monkeypatch.setattr(bench, "run_jobs", lambda jobs, n, w, *rest: batches.append((n, jobs)) or ["labeled_k2_s2"] * (
        len(batches) == 1))
    args = argparse.Namespace(work_dir=work, seeds=[0, 1, 2], k=2, iterations=1000, from_iterations=1000, jobs=3,
                              device="cuda", bcp=["bcp_labeled_loss_weight=1"], redo=False, results="r.jsonl",
                              iterations_per_epoch=25, test_images=None, test_labels="/x/labelsTs",
                              arms=["labeled_continue", "bcp_continue"])
    with pytest.raises(SystemExit, match="labeled_k2_s2"):
        bench.protocol(args)
    (n1, first), (n2, second) = batches
    assert n1 == n2 == 3 and [name for name, _ in first] == ["labeled_k2_s1", "labeled_k2_s2"]
    assert [name for name, _ in second] == ["bcp_continue_k2_s0_labeled_loss_weight=1", "labeled_continue_k2_s1",
                                            "bcp_continue_k2_s1_labeled_loss_weight=1"]  # seed 2's L failed
    argv = second[0][1]
    assert argv[argv.index("--arm") + 1] == "bcp_continue" and argv[argv.index("--bcp") + 1] == \
        "bcp_labeled_loss_weight=1"
    assert "--bcp" not in second[1][1] and argv[argv.index("--test-labels") + 1] == "/x/labelsTs"
    batches.clear()  # --arms bcp_continue: a candidate beside continuations that are already running
    with pytest.raises(SystemExit, match="labeled_k2_s2"):
        bench.protocol(argparse.Namespace(**{**vars(args), "arms": ["bcp_continue"]}))
    assert [name for name, _ in batches[1][1]] == ["bcp_continue_k2_s0_labeled_loss_weight=1",
                                                   "bcp_continue_k2_s1_labeled_loss_weight=1"]


def test_benchmark_protocol_runs_candidates_after_both_arms_in_order_of_priority(tmp_path, monkeypatch):
    bench = _load("benchmark_label_scarce")
    work = str(tmp_path)
    for seed in (0, 1):
        os.makedirs(join(work, "models", f"labeled_k2_s{seed}", "fold_0"))
        open(join(work, "models", f"labeled_k2_s{seed}", "fold_0", "checkpoint_final.pth"), "w").close()
    batches = []
    monkeypatch.setattr(bench, "run_jobs", lambda jobs, n, w, deadline, dry: batches.append((jobs, deadline, dry)) or [])
    args = argparse.Namespace(work_dir=work, seeds=[0, 1], k=2, iterations=1000, from_iterations=1000, jobs=9,
                              device="cuda", bcp=[], redo=False, results="r.jsonl", iterations_per_epoch=25,
                              test_images=None, test_labels=None, arms=["labeled_continue", "bcp_continue"],
                              candidate=["bcp_labeled_loss_weight=1", "bcp_teacher_weak_view=true,bcp_alpha=0.3", ""],
                              no_start_after=300, dry_run=True)
    bench.protocol(args)
    (first, deadline, dry), (second, _, _) = batches
    assert first == [] and dry and 0 < deadline - __import__("time").time() <= 300
    assert [name for name, _ in second] == [
        "labeled_continue_k2_s0", "bcp_continue_k2_s0", "labeled_continue_k2_s1", "bcp_continue_k2_s1",  # (i)
        "bcp_continue_k2_s0_labeled_loss_weight=1", "bcp_continue_k2_s1_labeled_loss_weight=1",  # (ii)
        "bcp_continue_k2_s0_alpha=0.3_teacher_weak_view=true", "bcp_continue_k2_s1_alpha=0.3_teacher_weak_view=true"]
    argv = second[-1][1]  # the empty candidate repeats (b) and is not scheduled twice
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--bcp"] == ["bcp_teacher_weak_view=true", "bcp_alpha=0.3"]


def test_benchmark_run_jobs_starts_nothing_after_the_deadline(tmp_path, capsys):
    bench = _load("benchmark_label_scarce")
    import sys
    import time
    jobs = [(f"job{i}", [sys.executable, "-c", "print('ran')"]) for i in range(3)]
    assert bench.run_jobs(jobs, 2, str(tmp_path), deadline=time.time() - 1) == ["job0", "job1", "job2"]
    assert not os.listdir(str(tmp_path)) and capsys.readouterr().out.count("NOT STARTED") == 3
    assert bench.run_jobs(jobs[:1], 1, str(tmp_path), dry_run=True) == [] and not os.listdir(str(tmp_path))
    assert bench.run_jobs(jobs[:1], 1, str(tmp_path), deadline=time.time() + 60) == []
    assert open(join(str(tmp_path), "job0.out")).read() == "ran\n"


def test_device_protocol_script_schedules_the_missing_runs(tmp_path):
    """examples/device/protocol.sh on the CPU, --dry-run. By default K=4: L of every seed, then (a) and (b) in the
    plugin's default configuration of every seed. With K=2, the paper's (b) and two candidates: L, (a) and (b), then the supervised-term candidate, then the weak-view candidate."""
    import subprocess
    import sys
    script = os.path.join(EXAMPLES, "device", "protocol.sh")
    env = {**os.environ, "WORK": str(tmp_path / "w"), "OUT": str(tmp_path / "o"), "DEVICE": "cpu",
           "PYTHON": sys.executable}

    def dry_run(**settings):
        done = subprocess.run(["bash", script, "--dry-run"], env={**env, **settings}, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return [line for line in done.stdout.splitlines() if line.startswith("would run ")]

    def names(lines):
        return [line.split()[2].rstrip(":") for line in lines]

    lines = dry_run()
    assert names(lines) == [f"labeled_k4_s{s}" for s in range(3)] + [
        name for s in range(3) for name in (f"labeled_continue_k4_s{s}", f"bcp_continue_k4_s{s}_labeled_loss_weight=1")]
    assert "--bcp bcp_labeled_loss_weight=1" in lines[-1] and "-k 4" in lines[-1]

    lines = dry_run(K="2", BCP="", CANDIDATES="bcp_labeled_loss_weight=1 bcp_teacher_weak_view=true")
    assert names(lines) == [f"labeled_k2_s{s}" for s in range(3)] + [
        f"{arm}_k2_s{s}" for s in range(3) for arm in ("labeled_continue", "bcp_continue")] + [
        f"bcp_continue_k2_s{s}_labeled_loss_weight=1" for s in range(3)] + [
        f"bcp_continue_k2_s{s}_teacher_weak_view=true" for s in range(3)]
    assert all("--device cpu" in line and f"--results {tmp_path / 'o' / 'label_scarce.jsonl'}" in line
               for line in lines)
    assert "--bcp bcp_teacher_weak_view=true" in lines[-1] and "-k 2" in lines[-1]
    assert "--arm bcp -k 4" not in "\n".join(lines)


def test_benchmark_reader_and_per_case_dice():
    bench = _load("benchmark_label_scarce")
    assert type(bench.reader_writer({"overwrite_image_reader_writer": "NibabelIO"})).__name__ == "NibabelIO"
    assert type(bench.reader_writer({})).__name__ == "SimpleITKIO"
    summary = {"metric_per_case": [{"reference_file": "/l/hippocampus_001.nii.gz", "metrics": {
        "1": {"Dice": 0.8, "IoU": 0.7}, "2": {"Dice": 0.6}}}]}
    assert bench.dice_per_case(summary, ".nii.gz", [1, 2]) == {"hippocampus_001": {"1": 0.8, "2": 0.6}}


def test_demo_dice_is_nnunets_and_leaves_out_a_class_absent_from_both_maps(tmp_path):
    """The demo's table reads nnU-Net's evaluation: a class missing from both the reference and the prediction of a
    case is left out of that class's mean (nnU-Net's NaN), not counted as 0."""
    from nnunetv2_bcp.demo.run_demo import dice_per_class
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    first = np.zeros((4, 4, 4), np.uint8)
    first[:2] = 1  # class 2 in neither map
    second_ref, second_pred = np.full((4, 4, 4), 2, np.uint8), np.full((4, 4, 4), 2, np.uint8)
    second_ref[0], second_pred[0, :2] = 1, 1  # class 1: 16 voxels against 8 inside them
    for name, r, p in (("a", first, first), ("b", second_ref, second_pred)):
        sitk.WriteImage(sitk.GetImageFromArray(r), str(ref / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(p), str(pred / f"{name}.nii.gz"))
    scores = dice_per_class(str(pred), str(ref), {"background": 0, "one": 1, "two": 2})
    assert scores["one"] == pytest.approx((1 + 2 * 8 / 24) / 2)
    assert scores["two"] == pytest.approx(2 * 48 / (48 + 56))


def test_benchmark_trainers_take_settings_from_the_environment(monkeypatch):
    bench = _load("benchmark_label_scarce")
    trainers = {}
    exec(compile(bench.TRAINERS, "bcp_benchmark_trainers.py", "exec"), trainers)
    trainer = argparse.Namespace(bcp_alpha=0.5, bcp_teacher_weak_view=False)
    monkeypatch.setenv("BENCH_SETTINGS", json.dumps({"bcp_alpha": 0.3, "bcp_teacher_weak_view": True}))
    trainers["_settings"](trainer)
    assert trainer == argparse.Namespace(bcp_alpha=0.3, bcp_teacher_weak_view=True)
    monkeypatch.setenv("BENCH_SETTINGS", json.dumps({"bcp_alpah": 0.3}))  # a typo must not pass silently
    with pytest.raises(AttributeError, match="bcp_alpah"):
        trainers["_settings"](trainer)


def test_benchmark_bcp_runs_train_the_papers_configuration_changed_by_their_settings(monkeypatch):
    """A BCP run without --bcp trains the paper's stage 2 whatever the plugin's defaults are (rows keep their meaning
    when a default changes); --bcp changes it."""
    bench = _load("benchmark_label_scarce")
    trainers = {}
    exec(compile(bench.TRAINERS, "bcp_benchmark_trainers.py", "exec"), trainers)
    plugin_defaults = {"bcp_alpha": 0.3, "bcp_labeled_loss_weight": 1.0, "bcp_teacher_weak_view": True,
                       "bcp_ema_decay": 0.9, "bcp_mask_ratio": 0.5, "bcp_largest_component": False,
                       "bcp_stage_one": "nnunet", "bcp_pretrain_fraction": 0.5, "bcp_restart_lr": True}

    def plugin_init(self, plans, configuration, fold, dataset_json, device):  # nnUNetTrainerBCP's __init__, defaults
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50
        self.device, self.save_every = device, 50
        self.bcp_pretrain_epochs = None
        for name, value in plugin_defaults.items():
            setattr(self, name, value)

    monkeypatch.setattr(trainers["nnUNetTrainerBCP"], "__init__", plugin_init)
    monkeypatch.setenv("BENCH_EPOCHS", "40")
    monkeypatch.setenv("BENCH_ITERATIONS", "25")
    monkeypatch.setenv("BENCH_CONTINUE", "1")
    monkeypatch.delenv("BENCH_SETTINGS", raising=False)
    paper = trainers["BenchBCP"](None, "3d_fullres", 0, None)
    assert {name: getattr(paper, name) for name in plugin_defaults} == trainers["PAPER"]
    assert trainers["PAPER"]["bcp_labeled_loss_weight"] == 0.0 and paper.bcp_pretrain_epochs == 0
    from nnunetv2_bcp.training.nnUNetTrainerBCP import STAGE_SETTINGS, STAGE_TWO_SETTINGS
    # a new setting needs its paper value here (the stage 1 length as a share of the schedule)
    stage_one = set(STAGE_SETTINGS) - {"bcp_pretrain_epochs"} | {"bcp_pretrain_fraction"}
    assert set(trainers["PAPER"]) == set(STAGE_TWO_SETTINGS) | stage_one
    monkeypatch.setenv("BENCH_SETTINGS", json.dumps({"bcp_labeled_loss_weight": 1}))
    changed = trainers["BenchBCP"](None, "3d_fullres", 0, None)
    assert changed.bcp_labeled_loss_weight == 1 and changed.bcp_alpha == trainers["PAPER"]["bcp_alpha"] == 0.5
    # a CPU run saves a checkpoint every epoch, so that a run stopped with its session resumes where it was
    on_cpu = trainers["BenchBCP"](None, "3d_fullres", 0, None, torch.device("cpu"))
    assert changed.save_every == 10 and on_cpu.save_every == 1


def test_cost_benchmark_times_bcp_on_a_label_subset_as_the_device_check_has(tmp_path):
    """The device check's data (examples/device/make_cost_data.py) has a label subset and no imagesUnlabeled: the
    cost benchmark's BCP trainer must opt in to the subset there, or it refuses to train, and must not where there
    is none (a trainer named for a subset stops without one). A full run of the benchmark on such a copy of
    Dataset990 takes a minute here; run by hand, see docs/benchmarks.md."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_bcp import nnUNetTrainerBCP
    from nnunetv2_bcp.unlabeled.label_subset import LABEL_SUBSET_FILE
    cost = _load("benchmark_cost")
    assert cost.trainer_class("bcp", str(tmp_path)) is nnUNetTrainerBCP
    (tmp_path / LABEL_SUBSET_FILE).write_text("{}")
    bcp = cost.trainer_class("bcp", str(tmp_path))
    assert issubclass(bcp, nnUNetTrainerBCP) and bcp.uses_label_subset
    assert cost.trainer_class("plain", str(tmp_path)) is nnUNetTrainer


def test_cost_benchmark_counts_the_operators_of_a_step_by_source():
    from nnunetv2_bcp.bcp.ema import ema_update_
    cost = _load("benchmark_cost")
    student, teacher = torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(1, 2, 3)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)

    def step():
        optimizer.zero_grad()
        student(torch.rand(1, 1, 4, 4, 4)).square().mean().backward()
        optimizer.step()
        ema_update_(teacher, student, 0.99)

    counted = cost.dispatched_operators(step)
    sources = counted["by_source"]
    assert counted["total"] == sum(sources.values()) > 0
    assert {"torch/optim", "torch/autograd", "nnunetv2_bcp/bcp/ema.py"} <= set(sources)
    assert "other" in sources  # the forward pass here is this test's own code
    assert cost.dispatched_operators(lambda: None) == {"total": 0, "by_source": {}}


# ------------------------------------------------------------------------------------ ACDC benchmark
def _fake_acdc_h5(root, train_patients=8, val_patients=2, test_patients=2):
    """ACDC as the h5 distribution holds it: training volumes as slices (slice S holds the value S), validation
    volumes whole, test volumes as images only; the lists, the paper's patients first in train_slices.list."""
    import h5py
    os.makedirs(join(root, "data"))
    os.makedirs(join(root, "test_images"))
    patients = [f"patient{p:03d}" for p in range(1, train_patients + val_patients + test_patients + 1)]
    train, val, test = (patients[:train_patients], patients[train_patients:train_patients + val_patients],
                        patients[train_patients + val_patients:])
    volumes = lambda group: [f"{p}_frame0{f}" for p in group for f in (1, 2)]  # noqa: E731
    slices = []
    for volume in volumes(train):
        for s in range(1, 4):
            with h5py.File(join(root, "data", f"{volume}_slice_{s}.h5"), "w") as f:
                f["image"] = np.full((8, 6), s / 10, np.float32)
                f["label"] = np.full((8, 6), s, np.uint8)
            slices.append(f"{volume}_slice_{s}")
    for volume in volumes(val):
        with h5py.File(join(root, "data", f"{volume}.h5"), "w") as f:
            f["image"] = np.zeros((3, 8, 6), np.float32)
            f["label"] = np.ones((3, 8, 6), np.uint8)
    for volume in volumes(test):
        with h5py.File(join(root, "test_images", f"{volume}.h5"), "w") as f:
            f["image"] = np.zeros((3, 8, 6), np.float32)
    order = sorted(slices, key=lambda s: (train[::-1].index(s.split("_")[0]), s))  # the paper's: last patient first
    for name, lines in (("train.list", volumes(train)), ("val.list", volumes(val)), ("train_slices.list", order)):
        open(join(root, name), "w").write("\n".join(lines) + "\n")
    return train, val, test


def test_acdc_benchmark_converts_the_h5_distribution_and_keeps_test_patients_out(tmp_path):
    acdc = _load("benchmark_acdc")
    train, val, test = _fake_acdc_h5(str(tmp_path / "ACDC"))
    folder = acdc.convert(str(tmp_path / "ACDC"), str(tmp_path / "raw"))
    split = load_json(join(folder, "acdc_split.json"))
    assert split["labeled_sets"]["paper3"] == train[::-1][:3] and split["labeled_sets"]["paper7"] == train[::-1][:7]
    assert len(split["labeled_sets"]["random3_s1"]) == 3 and set(split["labeled_sets"]["random3_s1"]) <= set(train)
    image = sitk.ReadImage(join(folder, "imagesTr", "patient001_frame02_0000.nii.gz"))
    assert image.GetSpacing() == acdc.NOMINAL_SPACING and image.GetSize() == (6, 8, 3)
    label = sitk.GetArrayFromImage(sitk.ReadImage(join(folder, "labelsTr", "patient001_frame02.nii.gz")))
    assert label[:, 0, 0].tolist() == [1, 2, 3]  # slices stacked back in their order
    assert len(os.listdir(join(folder, "imagesTr"))) == len(os.listdir(join(folder, "labelsTr"))) == 2 * (8 + 2)
    assert sorted(os.listdir(join(folder, "imagesTs"))) == [f"{p}_frame0{f}_0000.nii.gz" for p in test for f in (1, 2)]
    assert not os.path.exists(join(folder, "labelsTs"))  # test labels are held out: never written
    assert not any(p in f for p in test for f in os.listdir(join(folder, "imagesTr")))
    assert load_json(join(folder, "dataset.json"))["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}

    splits = [{"train": split["train"], "val": split["val"]}]
    subset = acdc.label_subset(split, "paper3", splits)
    labeled = subset["folds"]["0"]["labeled"]
    assert sorted(labeled) == sorted(f"{p}_frame0{f}" for p in train[::-1][:3] for f in (1, 2))  # both frames
    assert sorted(labeled + subset["folds"]["0"]["unlabeled"]) == sorted(split["train"])
    assert "all" not in subset["folds"]  # fold 'all' would train on the validation patients
    with pytest.raises(SystemExit, match="--labeled-set paper5: not one of"):
        acdc.label_subset(split, "paper5", splits)


def test_acdc_compact_copy_prepares_the_same_raw_dataset_and_leaves_out_only_unlabeled_patients(tmp_path):
    """``compact`` (ACDC for a machine that gets 64 MiB per call) and ``prepare --compact``: the same images (to 1e-6),
    labels and split as from the h5 files; under a size limit the validation and labeled patients stay, and only
    whole unlabeled patients are left out (recorded)."""
    acdc = _load("benchmark_acdc")
    root = str(tmp_path / "ACDC")
    train, val, test = _fake_acdc_h5(root, train_patients=14)
    reference = acdc.convert(root, str(tmp_path / "raw_h5"))

    def compact(max_mb, name):
        out, out_test = str(tmp_path / name), str(tmp_path / f"{name}_test")
        acdc.compact(argparse.Namespace(acdc=root, out=out, out_test=out_test, max_mb=max_mb, seed=0))
        return acdc.convert_compact([out, out_test], str(tmp_path / f"raw_{name}"))

    folder = compact(100, "all")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        assert sorted(os.listdir(join(folder, sub))) == sorted(os.listdir(join(reference, sub)))
        for name in os.listdir(join(reference, sub)):
            ours, theirs = (sitk.ReadImage(join(f, sub, name)) for f in (folder, reference))
            assert ours.GetSpacing() == theirs.GetSpacing()
            assert np.allclose(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs), atol=1e-6)
    assert load_json(join(folder, "acdc_split.json")) == dict(load_json(join(reference, "acdc_split.json")),
                                                               omitted_train=[])

    folder = compact(0, "small")
    split = load_json(join(folder, "acdc_split.json"))
    labeled = {p for patients in split["labeled_sets"].values() for p in patients}
    unlabeled = sorted(set(train) - labeled)
    assert unlabeled and split["omitted_train"] == [f"{p}_frame0{f}" for p in unlabeled for f in (1, 2)]
    assert split["train"] == [v for v in load_json(join(reference, "acdc_split.json"))["train"]
                              if v.split("_")[0] in labeled] and split["val"] == [f"{p}_frame0{f}" for p in val
                                                                                  for f in (1, 2)]
    assert len(os.listdir(join(folder, "imagesTr"))) == len(split["train"]) + len(split["val"])
    assert len(os.listdir(join(folder, "imagesTs"))) == 2 * len(test)
    assert not os.path.exists(join(folder, "labelsTs"))


def _acdc_row(acdc, arm, iterations, dice, from_checkpoint=None, from_iterations=1000):
    per_case = {f"patient0{i}_frame01": {str(c): {"Dice": dice + 0.01 * i, "IoU": dice} for c in acdc.CLASSES}
                for i in range(5)}
    return {"run": acdc.run_name(arm, "paper3", iterations, from_iterations), "arm": arm, "labeled_set": "paper3",
            "labeled_patients": ["patient099"], "iterations": iterations, "from_checkpoint": from_checkpoint,
            "from_iterations": from_iterations if from_checkpoint else None, "validation_dice_mean": dice,
            "validation_iou_mean": dice, "validation_dice_per_class": {str(c): dice for c in acdc.CLASSES},
            "validation_per_case": per_case, "train_seconds": 10, "seconds_per_iteration": 0.1, "device": "cpu",
            "command": f"run --arm {arm}"}


def _acdc_table_text(acdc, rows, tmp_path):
    """``benchmark_acdc.py table`` on these rows, into a docs file of its own: the file's text."""
    results, docs = tmp_path / "acdc.jsonl", tmp_path / "benchmarks.md"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs.write_text("# Benchmarks\n")
    acdc.table(argparse.Namespace(results=str(results), docs=str(docs), extra_results=str(tmp_path / "none.jsonl")))
    return docs.read_text()


def test_acdc_benchmark_table_pairs_the_arms_that_started_from_the_same_model(tmp_path):
    acdc = _load("benchmark_acdc")
    assert acdc.run_name("bcp_continue", "paper3", 300, 1000) == "bcp_continue_paper3_it300_from1000"
    assert acdc.run_name("ceiling", "paper3", 1300, 1000) == "ceiling_it1300"
    rows = [_acdc_row(acdc, "labeled", 1000, 0.5), _acdc_row(acdc, "labeled_continue", 300, 0.6, "L1"),
            _acdc_row(acdc, "bcp_continue", 300, 0.7, "L1"), _acdc_row(acdc, "pseudo_continue", 300, 0.65, "L1"),
            _acdc_row(acdc, "bcp_continue", 500, 0.9, "another L", 4000),  # from another L: not paired
            _acdc_row(acdc, "bcp", 1300, 0.72)]  # from scratch: paired by its total iterations
    text = _acdc_table_text(acdc, rows, tmp_path)
    assert text.startswith("# Benchmarks\n") and acdc.TABLE_START in text
    bcp = [line for line in text.splitlines() if line.startswith("| (b)")]
    assert "+0.1000 [+0.1000, +0.1000], 5/5" in bcp[0] and "+0.0500 [" in bcp[0]  # vs (a) and vs (c)
    assert "| 300 (from L's 1000) | 0.7000 |" in bcp[0]  # the L each continuation started from is named
    assert "| 500 (from L's 4000) | 0.9000 |" in bcp[1] and "+0." not in bcp[1]
    one_command = next(line for line in text.splitlines() if line.startswith("| (d)"))
    assert "| +0.1200 [+0.1200, +0.1200], 5/5 | +0.0700 [" in one_command  # vs (a) and (c) of 300 after L's 1000
    assert "(d) − (b), the one command against the two-command recipe at 1300 iterations in all, per volume: " \
           "+0.0200 [+0.0200, +0.0200], better in 5/5" in text
    # another L's continuations (another machine's series) and a longer continuation of L1 change no pairing
    gpu_l = {**_acdc_row(acdc, "labeled_continue", 300, 0.1, "L on the GPU"), "device": "cuda",
             "run": acdc.run_name("labeled_continue", "paper3", 300, 1000, suffix="_gpu")}
    longer = _acdc_row(acdc, "labeled_continue", 1000, 0.2, "L1")
    text = _acdc_table_text(acdc, rows + [gpu_l, longer], tmp_path)
    bcp = [line for line in text.splitlines() if line.startswith("| (b)")]
    assert "+0.1000 [+0.1000, +0.1000], 5/5" in bcp[0]
    one_command = next(line for line in text.splitlines() if line.startswith("| (d)"))
    assert "| +0.1200 [+0.1200, +0.1200], 5/5 | +0.0700 [" in one_command


def test_acdc_volume_means_leave_out_a_class_absent_from_both_maps_as_nnunet_does():
    acdc = _load("benchmark_acdc")
    row = {"validation_per_case": {"patient001_frame01": {"1": {"Dice": 0.5}, "2": {"Dice": 0.7}, "3": {"Dice": 0.9}},
                                   "patient001_frame12": {"1": {"Dice": float("nan")}, "2": {"Dice": 0.6},
                                                          "3": {"Dice": 0.8}}}}
    assert acdc.volume_means(row) == pytest.approx({"patient001_frame01": 0.7, "patient001_frame12": 0.7})


def test_acdc_table_says_where_each_series_of_l_stands_in_the_budget_search(tmp_path):
    acdc = _load("benchmark_acdc")
    rows = [_acdc_row(acdc, "labeled", 1000, 0.5), _acdc_row(acdc, "labeled", 2000, 0.6),
            _acdc_row(acdc, "labeled", 4000, 0.605)]
    gpu = [{**_acdc_row(acdc, "labeled", b, dice), "device": "cuda",
            "run": acdc.run_name("labeled", "paper3", b, None, suffix="_gpu")}
           for b, dice in ((1000, 0.4), (2000, 0.5))]
    searches = [line for line in _acdc_table_text(acdc, rows + gpu, tmp_path).splitlines() if "budget search" in line]
    assert searches[0].startswith("L's budget search (budgets double until the doubling gains less than 0.01")
    assert searches[0].endswith("1000 → 2000 +0.1000 [+0.1000, +0.1000], better in 5/5; 2000 → 4000 +0.0050 "
                                "[+0.0050, +0.0050], better in 5/5: **converged at 2000**.")
    assert searches[1].startswith("L's budget search (`_gpu`)")
    assert searches[1].endswith("1000 → 2000 +0.1000 [+0.1000, +0.1000], better in 5/5: **not converged, next "
                                "budget 4000**.")
    assert len(searches) == 2
    single = _acdc_table_text(acdc, rows[:1], tmp_path)  # one budget: no search to report yet
    assert "budget search" not in single


def test_acdc_benchmark_table_tells_two_runs_of_one_arm_apart_by_their_series(tmp_path):
    acdc = _load("benchmark_acdc")
    another = {**_acdc_row(acdc, "bcp", 1300, 0.74), "run": acdc.run_name("bcp", "paper3", 1300, suffix="_rule")}
    rows = [_acdc_row(acdc, "labeled", 1000, 0.5), _acdc_row(acdc, "bcp_continue", 300, 0.7, "L1"),
            _acdc_row(acdc, "bcp", 1300, 0.72), another]
    lines = _acdc_table_text(acdc, rows, tmp_path).splitlines()
    one_command = [line for line in lines if line.startswith("| (d)")]
    assert [line.split(" | ")[0] for line in one_command] == ["| (d) `-tr nnUNetTrainerBCP` from scratch",
                                                             "| (d) `-tr nnUNetTrainerBCP` from scratch `_rule`"]
    against_two = [line for line in lines if line.startswith("(d)")]
    assert against_two[0].startswith("(d) − (b), ") and "+0.0200 [" in against_two[0]
    assert against_two[1].startswith("(d) (`bcp_paper3_it1300_rule`) − (b), ") and "+0.0400 [" in against_two[1]


def _write_label_map(folder, name, array, spacing):
    import SimpleITK as sitk
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(folder / name))


def _three_class_reference():
    """A label map with one block of each of RV, MYO, LV."""
    reference = np.zeros((4, 24, 24), np.uint8)
    reference[1:3, 4:10, 4:10], reference[1:3, 12:18, 4:10], reference[1:3, 4:10, 12:18] = 1, 2, 3
    return reference


def test_acdc_hd95_in_voxels_per_volume_and_class(tmp_path):
    acdc = _load("benchmark_acdc")
    reference, predicted = np.zeros((4, 20, 20), np.uint8), np.zeros((4, 20, 20), np.uint8)
    reference[:, 2:18, 5], predicted[:, 2:18, 8] = 1, 1  # RV: a plane, predicted 3 voxels off (the spacing ignored)
    reference[1:3, 12:16, 12:16] = predicted[1:3, 12:16, 12:16] = 2  # MYO: exact
    reference[1:3, 2:4, 14:16] = 3  # LV: missed by the prediction
    _write_label_map(tmp_path / "labels", "patient001_frame01.nii.gz", reference, acdc.NOMINAL_SPACING)
    _write_label_map(tmp_path / "pred", "patient001_frame01.nii.gz", predicted, acdc.NOMINAL_SPACING)
    per_case = acdc.hd95_per_case(str(tmp_path / "pred"), str(tmp_path / "labels"))
    assert per_case == {"patient001_frame01": {"1": 3.0, "2": 0.0, "3": None}}
    summary = acdc.hd95_summary(per_case)
    assert summary["validation_hd95_per_class"] == {"1": 3.0, "2": 0.0, "3": None}
    assert summary["validation_hd95_mean"] is None and summary["validation_hd95_undefined"] == {"1": 0, "2": 0, "3": 1}
    assert acdc.hd95_cell(summary) == "undefined (1 volume-classes without it)"
    defined = acdc.hd95_summary({"a": {"1": 2.0, "2": 1.0, "3": 3.0}, "b": {"1": 4.0, "2": None, "3": 3.0}})
    assert defined["validation_hd95_mean"] == pytest.approx(7 / 3) and acdc.hd95_cell(defined) == \
        "2.33 (1 volume-classes without it)"


def test_acdc_metrics_with_each_class_largest_component_kept_join_rows_written_without_them(tmp_path):
    acdc = _load("benchmark_acdc")
    reference = _three_class_reference()
    predicted = reference.copy()
    predicted[3, 20:22, 20:22] = 1  # a stray RV blob far from the heart
    fold = tmp_path / "fold_0"
    for case in ("patient001_frame01", "patient001_frame02"):
        _write_label_map(tmp_path / "labels", f"{case}.nii.gz", reference, acdc.NOMINAL_SPACING)
        _write_label_map(fold / "validation", f"{case}.nii.gz", predicted, acdc.NOMINAL_SPACING)
    kept = acdc.keep_largest_components(str(fold / "validation"), str(tmp_path / "kept"))
    import SimpleITK as sitk
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(join(kept, "patient001_frame01.nii.gz"))), reference)
    metrics = acdc.extra_metrics(str(fold), str(tmp_path / "labels"), str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()  # the post-processed maps are not kept
    assert metrics["validation_hd95_per_class"]["1"] > 0 and metrics["validation_hd95_per_class"]["2"] == 0
    assert metrics["largest_component_dice_mean"] == 1.0 and metrics["largest_component_hd95_mean"] == 0.0
    assert set(metrics["largest_component_per_case"]) == {"patient001_frame01", "patient001_frame02"}

    rows = [_acdc_row(acdc, "labeled", 1000, 0.5), _acdc_row(acdc, "labeled_continue", 300, 0.6, "L1"),
            _acdc_row(acdc, "bcp_continue", 300, 0.7, "L1")]
    per_case = {case: {str(c): {"Dice": value, "IoU": value} for c in acdc.CLASSES}
                for case, value in zip(rows[1]["validation_per_case"], (0.5, 0.6, 0.7, 0.8, 0.9))}
    hd95 = acdc.hd95_summary({case: {str(c): 10.0 for c in acdc.CLASSES} for case in per_case})
    later = [{"run": r["run"], "of": acdc.fingerprint(r), **hd95,
              **acdc.hd95_summary(hd95["validation_hd95_per_case"], "largest_component"),
              "largest_component_dice_mean": 0.7 + 0.1 * i, "largest_component_dice_per_class": {"1": 0, "2": 0, "3": 0},
              "largest_component_per_case": {case: {str(c): {"Dice": v["1"]["Dice"] + 0.1 * i} for c in acdc.CLASSES}
                                             for case, v in per_case.items()}}
             for i, r in enumerate(rows[1:])]
    retrained = dict(later[0], of=dict(later[0]["of"], validation_dice_mean=0.1), largest_component_dice_mean=0.123)
    results, extra, docs = tmp_path / "acdc.jsonl", tmp_path / "acdc_extra.jsonl", tmp_path / "benchmarks.md"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra.write_text("".join(json.dumps(r) + "\n" for r in [later[0], retrained, later[1]]))  # of another training
    docs.write_text("# Benchmarks\n")
    acdc.table(argparse.Namespace(results=str(results), docs=str(docs), extra_results=str(extra)))
    table = docs.read_text().splitlines()
    a_rows = [line for line in table if line.startswith("| (a)")]
    assert "| 10.00 |" in a_rows[0] and "| 0.7000 |" in a_rows[1]  # HD95 as measured, then the second table
    assert "0.1230" not in docs.read_text()  # the metrics of another training of the same run name are not joined
    assert "| 0.5000 |  | " in next(line for line in table if line.startswith("| L"))  # L: no HD95, an empty cell
    b_kept = [line for line in table if line.startswith("| (b)")][1]
    assert "| 0.8000 |" in b_kept and "+0.1000 [+0.1000, +0.1000], 5/5; HD95 +0.0" in b_kept


def test_acdc_score_rates_every_runs_test_predictions_against_another_label_folder(tmp_path, capsys):
    acdc = _load("benchmark_acdc")
    reference = _three_class_reference()
    shifted = np.roll(reference, 2, axis=2)
    for folder, array in (("labels", reference), ("predictions/exact", reference), ("predictions/shifted", shifted)):
        _write_label_map(tmp_path / folder, "patient101_frame01.nii.gz", array, acdc.NOMINAL_SPACING)
    acdc.score(argparse.Namespace(labels=str(tmp_path / "labels"), predictions=str(tmp_path / "predictions"),
                                  work_dir=str(tmp_path / "work"), hd95=True))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "exact: mean Dice 1.0000 (RV MYO LV 1.0000 1.0000 1.0000); HD95 (voxels) 0.00"
    assert lines[1].startswith("shifted: mean Dice 0.6667 ") and lines[1].endswith("HD95 (voxels) 2.00")
    assert os.path.isfile(tmp_path / "work" / "test_score_shifted.json")


def test_acdc_curve_prints_the_pseudo_dice_per_epoch_and_keeps_a_reduced_progress_figure(tmp_path, capsys):
    acdc = _load("benchmark_acdc")
    fold = tmp_path / "work" / "models" / "labeled_paper3_it1000" / "fold_0"
    fold.mkdir(parents=True)
    dice = [0.1 * i for i in range(8)]
    torch.save({"logging": {"mean_fg_dice": [np.float64(d) for d in dice],
                            "ema_fg_dice": [np.float64(d / 2) for d in dice]}}, fold / "checkpoint_final.pth")
    from PIL import Image
    Image.new("RGB", (3000, 5400), "white").save(fold / "progress.png")  # nnU-Net's size
    acdc.curve(argparse.Namespace(work_dir=str(tmp_path / "work"), run="labeled_paper3_it1000", every=5,
                                  figures=str(tmp_path / "figures")))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:4] == ["    0 | 0.0000 | 0.0000", "    5 | 0.5000 | 0.2500", "    7 | 0.7000 | 0.3500"]
    with Image.open(tmp_path / "figures" / "acdc_labeled_paper3_it1000_progress.png") as figure:
        assert figure.size == (889, 1600)


def test_the_benchmarks_plugin_defaults_are_the_trainers_own(synthetic_3d):
    """``run --plugin-defaults`` (and ACDC's arms (b), (d)) change the benchmark's PAPER configuration into what
    ``nnUNetTrainerBCP`` trains by default: a default changed in the trainer must change them too."""
    from nnunetv2_bcp import nnUNetTrainerBCP
    bench = _load("benchmark_label_scarce")
    trainers = {}
    exec(compile(bench.TRAINERS, "bcp_benchmark_trainers.py", "exec"), trainers)
    plans = dict(load_json(join(synthetic_3d["preprocessed"], "nnUNetPlans.json")), continue_training=False)
    dataset_json = load_json(join(synthetic_3d["preprocessed"], "dataset.json"))
    plugin = nnUNetTrainerBCP(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    from_scratch = {**trainers["PAPER"], **bench.PLUGIN_DEFAULTS, **bench.PLUGIN_STAGE_DEFAULTS}
    assert from_scratch == {name: getattr(plugin, name) for name in from_scratch}
    args = argparse.Namespace(arm="bcp", plugin_defaults=True, bcp=["bcp_alpha=0.25"], bcp_pretrain_epochs=None,
                              bcp_alpha=None)
    assert bench.settings_of(args) == {**bench.PLUGIN_DEFAULTS, **bench.PLUGIN_STAGE_DEFAULTS, "bcp_alpha": 0.25}
    args.arm = "bcp_continue"  # a continuation has no stage 1
    assert bench.settings_of(args) == {**bench.PLUGIN_DEFAULTS, "bcp_alpha": 0.25}
    assert _load("benchmark_acdc").PLUGIN_DEFAULTS == bench.PLUGIN_DEFAULTS


def test_device_one_command_script_pairs_the_plugins_defaults_with_nnunet_per_seed(tmp_path):
    """examples/device/one_command.sh, DRY_RUN: per seed, BCP from scratch in the plugin's defaults (stages included)
    and nnU-Net on the same labeled cases, at the same iterations; every command parses."""
    import shlex
    import subprocess
    import sys
    bench = _load("benchmark_label_scarce")
    script = os.path.join(EXAMPLES, "device", "one_command.sh")
    done = subprocess.run(["bash", script], env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "o"),
                                                 "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [bench.command_line().parse_args(shlex.split(line)[2:]) for line in done.stdout.splitlines()]
    assert [(a.arm, a.seed, a.k, a.iterations) for a in runs] == [
        (arm, seed, 2, 2000) for seed in range(3) for arm in ("bcp", "labeled")]
    for a in runs:
        expected = {**bench.PLUGIN_DEFAULTS, **bench.PLUGIN_STAGE_DEFAULTS} if a.arm == "bcp" else {}
        assert bench.settings_of(a) == expected
    # candidates for the one command's stages: a BCP run each per seed, the defaults with the candidate's settings
    candidates = "bcp_pretrain_fraction=0.3 bcp_restart_lr=false,bcp_stage_one=copy_paste"
    done = subprocess.run(["bash", script], env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "o"),
                                                 "PYTHON": sys.executable, "SEEDS": "2", "CANDIDATES": candidates},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [bench.command_line().parse_args(shlex.split(line)[2:]) for line in done.stdout.splitlines()]
    defaults = {**bench.PLUGIN_DEFAULTS, **bench.PLUGIN_STAGE_DEFAULTS}
    assert [(a.arm, a.seed, bench.settings_of(a)) for a in runs] == [
        ("bcp", 2, defaults), ("labeled", 2, {}), ("bcp", 2, {**defaults, "bcp_pretrain_fraction": 0.3}),
        ("bcp", 2, {**defaults, "bcp_restart_lr": False, "bcp_stage_one": "copy_paste"})]


def test_device_acdc_script_runs_the_protocol_of_each_labeled_set_as_a_series_of_its_own(tmp_path):
    """examples/device/acdc.sh, DRY_RUN: per labeled set L, then (a), (b), (c), every name ending in _gpu (the CPU
    series keeps its names, and its committed test predictions are not overwritten)."""
    import subprocess
    import sys
    script = os.path.join(EXAMPLES, "device", "acdc.sh")
    done = subprocess.run(["bash", script], env={**os.environ, "DRY_RUN": "1", "WORK": str(tmp_path / "w"),
                                                 "OUT": str(tmp_path / "o"), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split()[2].rstrip(":") for line in done.stdout.splitlines() if line.startswith("would run ")]
    assert names == [name for s in ("paper3", "paper7", "random3_s1") for name in (
        f"labeled_{s}_it1000_gpu", f"labeled_continue_{s}_it300_from1000_gpu", f"bcp_continue_{s}_it300_from1000_gpu",
        f"pseudo_continue_{s}_it300_from1000_gpu")]
    # L's budget search: every budget up to SEARCH_MAX at once, the continuations once the rule has found the budget
    done = subprocess.run(["bash", script], env={**os.environ, "DRY_RUN": "1", "WORK": str(tmp_path / "w"),
                                                 "OUT": str(tmp_path / "o"), "PYTHON": sys.executable,
                                                 "FROM_ITERATIONS": "converged", "SETS": "paper3"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split()[2] for line in done.stdout.splitlines() if line.startswith("would run ")] == [
        f"labeled_paper3_it{b}_gpu:" for b in (1000, 2000, 4000, 8000)]


def test_acdc_budget_search_applies_the_reading_rule_then_continues_from_the_converged_l(tmp_path, capsys):
    """``protocol --from-iterations converged``: L's budgets double until the doubling gains less than 0.01 mean
    validation Dice; the continuations start from the smallest such budget, (d) at its total."""
    acdc = _load("benchmark_acdc")
    assert acdc.converged_budget({}, 1000) == (None, 1000)
    assert acdc.converged_budget({1000: 0.54}, 1000) == (None, 2000)
    assert acdc.converged_budget({1000: 0.54, 2000: 0.59}, 1000) == (None, 4000)
    assert acdc.converged_budget({1000: 0.54, 2000: 0.59, 4000: 0.599}, 1000) == (2000, None)
    assert acdc.converged_budget({1000: 0.54, 2000: 0.545, 4000: 0.7}, 1000) == (1000, None)
    assert acdc.converged_budget({2000: 0.59, 4000: 0.595}, 1000) == (None, 1000)  # the search starts at its start
    results, work = tmp_path / "acdc.jsonl", tmp_path / "w"
    rows = [_acdc_row(acdc, "labeled", 1000, 0.5384), _acdc_row(acdc, "labeled", 2000, 0.5903),
            dict(_acdc_row(acdc, "labeled", 4000, 0.9), run="labeled_paper3_it4000_gpu"),  # another series
            dict(_acdc_row(acdc, "labeled", 4000, 0.9), plans="nnUNetPlans_bs8")]  # another batch size
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    work.mkdir()
    (work / "acdc_bench.json").write_text(json.dumps({"batch_size": 4, "plans": "nnUNetPlans_bs4"}))
    args = argparse.Namespace(work_dir=str(work), labeled_set="paper3", device="cpu", results=str(results),
                              predictions=str(tmp_path / "p"), iterations_per_epoch=25, name_suffix="",
                              test_images=None, from_iterations="converged", search_start=1000, search_max=16000,
                              iterations=300, arms=["labeled_continue", "bcp_continue", "bcp"], jobs=1, dry_run=True)
    with pytest.raises(SystemExit) as stop:
        acdc.protocol(argparse.Namespace(**vars(args)))
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "not converged: training labeled_paper3_it4000" in out
    assert [line.split()[2] for line in out.splitlines() if line.startswith("would run")] == ["labeled_paper3_it4000:"]
    # a kept model counts as a row (a GPU machine's results file starts empty at each call)
    for iterations, dice in ((2000, 0.5903), (4000, 0.595)):
        kept = work / "models" / f"labeled_paper3_it{iterations}"
        kept.mkdir(parents=True)
        (kept / "result.json").write_text(json.dumps(_acdc_row(acdc, "labeled", iterations, dice)))
    acdc.protocol(argparse.Namespace(**vars(args)))
    out = capsys.readouterr().out
    assert "converged at 2000 iterations" in out
    assert [line.split()[2] for line in out.splitlines() if line.startswith("would run")] == [
        "labeled_continue_paper3_it300_from2000:", "bcp_continue_paper3_it300_from2000:", "bcp_paper3_it2300:"]
    with pytest.raises(SystemExit, match="not converged by --search-max 2000"):
        acdc.protocol(argparse.Namespace(**{**vars(args), "search_max": 2000, "dry_run": False,
                                            "work_dir": str(tmp_path / "w2")}))


def test_acdc_run_records_the_code_of_each_of_its_starts(tmp_path, monkeypatch):
    acdc = _load("benchmark_acdc")
    monkeypatch.setenv("BENCH_CODE_VERSION", "aaa1111")
    assert acdc.code_per_start(str(tmp_path), resumed=False) == ["aaa1111"]
    monkeypatch.setenv("BENCH_CODE_VERSION", "bbb2222")
    assert acdc.code_per_start(str(tmp_path), resumed=True) == ["aaa1111", "bbb2222"]  # resumed on other code
    assert acdc.code_per_start(str(tmp_path), resumed=False) == ["bbb2222"]  # started over


def test_benchmark_code_version_counts_changed_code_not_the_rows_runs_append(tmp_path, monkeypatch):
    import subprocess
    bench = _load("benchmark_label_scarce")
    monkeypatch.delenv("BENCH_CODE_VERSION", raising=False)
    os.makedirs(tmp_path / "examples" / "results")
    (tmp_path / "examples" / "results" / "acdc.jsonl").write_text("{}\n")
    (tmp_path / "examples" / "benchmark_acdc.py").write_text("x = 1\n")

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "code")
    commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    (tmp_path / "examples" / "results" / "acdc.jsonl").write_text("{}\n{}\n")  # a run appended its row
    assert bench.code_version(str(tmp_path)) == commit
    (tmp_path / "examples" / "benchmark_acdc.py").write_text("x = 2\n")
    assert bench.code_version(str(tmp_path)) == commit + "+changes"
