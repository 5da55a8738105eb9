#!/usr/bin/env bash
# The label-scarce protocol (docs/benchmarks.md) on the GPU machine, in one call. By default: K=4, per seed (0 1 2)
# the labeled-only model L (1000 iterations), then from L for 1000 more (a) labeled-only continued and (b) BCP
# continued in the plugin's default configuration (BCP=bcp_labeled_loss_weight=1: the benchmark's BCP runs start
# from the paper's configuration and name what they change). L is retrained in every session (a machine starts
# bare), and a new L needs its own (a) and (b). CANDIDATES (each NAME=VALUE[,NAME=VALUE])
# run after (a) and (b) of every seed, in order; each is the paper's configuration changed by its own settings only
# (not by BCP's: a candidate on top of the default names bcp_labeled_loss_weight=1 itself, e.g.
# CANDIDATES=bcp_labeled_loss_weight=1,bcp_teacher_weak_view=true). K=2 with two candidates:
#   -- env K=2 BCP= CANDIDATES="bcp_labeled_loss_weight=1 bcp_teacher_weak_view=true" bash examples/device/protocol.sh
# Each run's row (test Dice per case, and the validation Dice of its final checkpoint, on which candidates are chosen)
# is appended to $OUT/label_scarce.jsonl as soon as that run is scored, so a timeout still returns every finished
# run; the runs' logs ($OUT/run_logs.tar.gz) and the tables ($OUT/tables.md) are written at the end, also when the
# call is stopped (SIGTERM from device_check.sh's time limit).
#
# THE CALLS (one session; its 15 minutes of device time: the machine's start, ~1-2 min, call 1, call 2; then
# give_back). The installation of call 1 (.device/site, ignored) stays on the warm machine; call 2 must follow within
# the 30 s it stays warm. .whl (48 MB) and .device/bench (58 MB) do not fit in one call's 64 MiB.
#   1. run(command="bash examples/device_check.sh --skip-tests --skip-cost", carry=[".whl"], timeout_s=150)
#   2. run(command="CODE_VERSION=COMMIT bash examples/device_check.sh --skip-tests --skip-cost --budget 585 -- bash examples/device/protocol.sh",
#          carry=[".device/bench"], timeout_s=600)
#      (COMMIT: this checkout's `git rev-parse --short HEAD`, written into the command; the device copy has no git
#      history, and the rows record it as their code version)
#   Then: give_back(); append $OUT's label_scarce.jsonl (under files_at) to examples/results/hippocampus_label_scarce.jsonl
#   here and run `python examples/benchmark_label_scarce.py table`.
# .whl: see examples/device_check.sh's header. .device/bench is made here with:
#   python examples/benchmark_label_scarce.py prepare --msd ../shared/data/Task04_Hippocampus -w .device/bench
#
# BUDGET (H200, rows of 2026-11-26 with "device": "cuda"): 3 L at once (beside a K=4 BCP run) took 128-136 s of
# training, 170-177 s with prediction and evaluation of the 40 test cases; then 9 continuations at once (3 (a), 3 (b),
# 3 of one candidate) took 163-176 s (a) / 302-318 s (b) of training, 214-220 s / 351-357 s in all, ending ~530 s after
# the start. The default call (K=4, 9 runs; rows of 2026-11-27) took 149-157 s of training for the 3 L, then 154-164 s
# (a) / 228-238 s (b) for the 6 continuations at once, and ended 486 s after the protocol's start (the call: 499 s with
# --budget 575, after a device check of 246 s on the same warm machine; 786 s of device time in all). Runs queued behind those (CANDIDATES) start only in
# the first NO_START_AFTER=300 s (a 7th BCP run beside six would slow them all past the limit). A run whose model is
# already in $WORK/models is skipped, so a rerun on the same warm machine goes on where the last stopped.
#
# Logic test on the CPU (lists the runs in the order they would start; tests/test_examples.py runs it):
#   WORK=/tmp/w OUT=/tmp/o DEVICE=cpu PYTHON=.venv/bin/python bash examples/device/protocol.sh --dry-run
# Arguments after the script's name go to `benchmark_label_scarce.py protocol`.
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-.device/bench} SEEDS=${SEEDS:-"0 1 2"} K=${K:-4} DEVICE=${DEVICE:-cuda} PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-9} NO_START_AFTER=${NO_START_AFTER:-300}
BCP=${BCP-"bcp_labeled_loss_weight=1"} CANDIDATES=${CANDIDATES-""}
OUT=${OUT:-.device/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2} PYTHONUNBUFFERED=1 BENCH_CODE_VERSION=${CODE_VERSION:-unknown}
B=("$PYTHON" examples/benchmark_label_scarce.py)
C=()
set -f  # settings are JSON values: no glob expansion of e.g. [4,4,4]
for setting in $BCP; do C+=(--bcp "$setting"); done
for candidate in $CANDIDATES; do C+=(--candidate "$candidate"); done
set +f

finish() {
    [ -d "$WORK" ] && (cd "$WORK" && tar czf "$OUT/run_logs.tar.gz" $(ls *.log *.out 2>/dev/null) 2>/dev/null)
    if [ -s "$OUT/label_scarce.jsonl" ]; then
        timeout 20 "${B[@]}" table --results "$OUT/label_scarce.jsonl" --docs "$OUT/tables.md" > /dev/null 2>&1
        "$PYTHON" - "$OUT/label_scarce.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['run']:45s} validation {r.get('validation_dice_mean', float('nan')):.4f}  test {r['dice_mean']:.4f}")
PY
    fi
}
"${B[@]}" protocol -w "$WORK" --seeds $SEEDS -k "$K" --device "$DEVICE" --jobs "$JOBS" \
    --no-start-after "$NO_START_AFTER" "${C[@]}" --results "$OUT/label_scarce.jsonl" "$@" &
protocol=$!
trap 'kill -TERM $protocol 2>/dev/null; wait $protocol; finish; exit 143' TERM INT
wait $protocol
status=$?
finish
exit $status
