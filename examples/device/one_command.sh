#!/usr/bin/env bash
# The one command against nnU-Net at the same total iterations, on the GPU machine in one call. Per label-subset seed
# (SEEDS, default 0 1 2; K=2): `nnUNetTrainerBCP` from scratch in the plugin's defaults (`run --arm bcp
# --plugin-defaults`: stage 1 nnU-Net's own training for half of the iterations, then BCP with the learning rate
# restarted) and nnU-Net on the same labeled cases (`run --arm labeled`), both for ITERATIONS (default 2000: the
# budget of the two-command rows, L 1000 + 1000, which they are compared with). All runs start at once; each run's
# row is appended to $OUT/label_scarce.jsonl as soon as it is scored; the logs go to $OUT/run_logs.tar.gz.
# CANDIDATES (default none): settings the one command could have instead of its defaults, each a BCP run of its own
# per seed on top of the defaults (`--plugin-defaults --bcp NAME=VALUE`; several in one candidate: joined by ","),
# e.g. CANDIDATES="bcp_pretrain_fraction=0.3 bcp_restart_lr=false bcp_stage_one=copy_paste"; chosen on validation
# by the rule in docs/benchmarks.md ("Choosing the one command's stages").
#
# THE CALLS: as examples/device/protocol.sh's (call 1 installs; call 2 follows within the 30 s the machine stays warm):
#   2. run(command="CODE_VERSION=COMMIT bash examples/device_check.sh --skip-tests --skip-cost --budget 585 -- bash examples/device/one_command.sh",
#          carry=[".device/bench"], timeout_s=600)
#      (COMMIT: this checkout's `git rev-parse --short HEAD`, written into the command; the device copy has no git
#      history, and the rows record it as their code version)
# BUDGET (not measured yet): from the rows of 2026-11-27 (cuda), 1000 nnU-Net iterations took ~150 s with 3 runs at
# once and 1000 BCP iterations 230-320 s with 6-9 at once: ~500 s for a BCP run here. A call stopped by its limit,
# run again on the warm machine, resumes each run from its latest checkpoint (every 10 epochs on a GPU).
# Then here: append $OUT's label_scarce.jsonl to examples/results/hippocampus_label_scarce.jsonl and run
# `python examples/benchmark_label_scarce.py table`.
#
# Logic test on the CPU (prints the runs; tests/test_examples.py runs it):
#   DRY_RUN=1 OUT=/tmp/o PYTHON=.venv/bin/python bash examples/device/one_command.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-.device/bench} SEEDS=${SEEDS:-"0 1 2"} K=${K:-2} ITERATIONS=${ITERATIONS:-2000} DEVICE=${DEVICE:-cuda}
CANDIDATES=${CANDIDATES:-}
PYTHON=${PYTHON:-python3} OUT=${OUT:-.device/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2} PYTHONUNBUFFERED=1 BENCH_CODE_VERSION=${CODE_VERSION:-unknown}
pids=()
for seed in $SEEDS; do
    arms=("bcp --plugin-defaults" "labeled")
    for candidate in $CANDIDATES; do
        arms+=("bcp --plugin-defaults --bcp ${candidate//,/ --bcp }")
    done
    for i in "${!arms[@]}"; do
        arm=${arms[$i]}
        # shellcheck disable=SC2206  # the arm and its flags are several words
        run=("$PYTHON" examples/benchmark_label_scarce.py run --arm $arm -k "$K" --seed "$seed"
             --iterations "$ITERATIONS" -w "$WORK" --device "$DEVICE" --results "$OUT/label_scarce.jsonl")
        if [ -n "${DRY_RUN:-}" ]; then
            echo "${run[*]}"
            continue
        fi
        "${run[@]}" > "$OUT/one_command_${arm%% *}_s${seed}_$i.out" 2>&1 &
        pids+=($!)
    done
done
[ -n "${DRY_RUN:-}" ] && exit 0
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 143' TERM INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ -d "$WORK" ] && (cd "$WORK" && tar czf "$OUT/run_logs.tar.gz" $(ls *.log *.out 2>/dev/null) 2>/dev/null)
exit $status
