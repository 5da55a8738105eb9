#!/usr/bin/env bash
# The ACDC protocol (examples/benchmark_acdc.py) on the GPU machine: per labeled set (SETS, default paper3 paper7
# random3_s1, all at once) L for FROM_ITERATIONS (1000; "converged": L's budget search, every budget from SEARCH_START
# (1000) to SEARCH_MAX (8000) at once, and the converged one by the rule of benchmark_acdc.converged_budget), then
# (a) nnU-Net continued, (b) BCP in the plugin's defaults and (c) offline pseudo-labels for ITERATIONS (300) each,
# 3 at once per set: the CPU protocol's budget, so that the sets compare with the CPU rows of paper3. ACDC travels compact (`benchmark_acdc.py compact`: the validation and
# labeled patients whole, as many unlabeled patients as fit; rows record `training_volumes_left_out`). Each run's row
# is appended to $OUT/acdc.jsonl as it lands, its test label maps go to $OUT/acdc_test_predictions/<run>/; run names end
# in SUFFIX (_gpu), apart from the CPU series.
#
# BEFORE (here): the wheels of examples/device_check.sh (.whl, 48 MB; its header), then (2 min on 2 cores)
#   python examples/benchmark_acdc.py compact --acdc ../shared/data/ACDC --out .device/acdc --out-test .device/acdc_test
# which wrote all 160 training and validation volumes in 55.8 MB and the 40 test images in 13.7 MB (none left out;
# the images equal the float ones to 4e-5). Call 1 carries 65.2 MB with the tree (3.6 MB, growing with every committed
# result), call 2 59.4 MB (of 67.1). Past the limit, carry .whl and .device/acdc_test in two calls (an ignored path a
# call does not carry stays on the warm machine).
# THE CALLS (one session: machine start, call 1, call 2 within the 30 s the machine stays warm, give_back):
#   1. run(command="bash examples/device_check.sh --skip-tests --skip-cost", carry=[".whl", ".device/acdc_test"],
#          timeout_s=150)     # installs nnU-Net into .device/site; the test images stay on the machine
#   2. run(command="CODE_VERSION=$(git rev-parse --short HEAD) bash examples/device_check.sh --skip-tests --skip-cost
#          --budget 585 -- bash examples/device/acdc.sh", carry=[".device/acdc"], timeout_s=600)
#      (write the commit into the command: the device copy has no git history)
#   Then here: append $OUT/acdc.jsonl to examples/results/acdc.jsonl, copy $OUT/acdc_test_predictions/* to
#   examples/results/acdc_test_predictions/, unpack $OUT/validation_predictions.tar.gz into a prepared work dir
#   (bench_acdc), run `python examples/benchmark_acdc.py add-metrics -w bench_acdc` (HD95 and the largest-component
#   metrics: MONAI does not travel) and `python examples/benchmark_acdc.py table`.
# BUDGET (not measured: no ACDC run on a GPU yet): preparing ~1-2 min on 16 cores; the Hippocampus L (1000 its,
# 3 at once) took ~150 s and its continuations 150-320 s at 6-9 at once. A call stopped by its limit, run again on the
# warm machine, resumes: finished runs are skipped, a stopped one goes on from its latest checkpoint.
#
# Logic test on the CPU (prints the runs; tests/test_examples.py runs it):
#   DRY_RUN=1 WORK=/tmp/w OUT=/tmp/o PYTHON=.venv/bin/python bash examples/device/acdc.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-.device/acdc_bench} DATA=${DATA:-".device/acdc .device/acdc_test"} SETS=${SETS:-"paper3 paper7 random3_s1"}
FROM_ITERATIONS=${FROM_ITERATIONS:-1000} SEARCH_START=${SEARCH_START:-1000}
SEARCH_MAX=${SEARCH_MAX:-8000} ITERATIONS=${ITERATIONS:-300} DEVICE=${DEVICE:-cuda} BATCH=${BATCH:-4}
PYTHON=${PYTHON:-python3} OUT=${OUT:-.device/out} SUFFIX=${SUFFIX-_gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2} PYTHONUNBUFFERED=1 BENCH_CODE_VERSION=${CODE_VERSION:-unknown}
B=("$PYTHON" examples/benchmark_acdc.py)
if [ -z "${DRY_RUN:-}" ] && [ ! -f "$WORK/acdc_bench.json" ]; then
    # shellcheck disable=SC2086  # DATA is a list of folders
    "${B[@]}" prepare --compact $DATA -w "$WORK" --batch-size "$BATCH" > "$OUT/prepare.log" 2>&1 \
        || { tail -20 "$OUT/prepare.log"; exit 1; }
fi
pids=()
for set in $SETS; do
    protocol=("${B[@]}" protocol -w "$WORK" --labeled-set "$set" --from-iterations "$FROM_ITERATIONS"
              --search-start "$SEARCH_START" --search-max "$SEARCH_MAX"
              --iterations "$ITERATIONS" --arms labeled_continue bcp_continue pseudo_continue --jobs 3
              --device "$DEVICE" --name-suffix "$SUFFIX" --results "$OUT/acdc.jsonl"
              --predictions "$OUT/acdc_test_predictions")
    if [ -n "${DRY_RUN:-}" ]; then
        "${protocol[@]}" --dry-run
        continue
    fi
    "${protocol[@]}" > "$OUT/protocol_$set.out" 2>&1 &
    pids+=($!)
done
[ -n "${DRY_RUN:-}" ] && exit 0
finish() {
    [ -d "$WORK" ] && (cd "$WORK" && tar czf "$OUT/run_logs.tar.gz" $(ls *.log *.out 2>/dev/null) 2>/dev/null)
    # the final validation label maps of every finished run (about 1 MB), for add-metrics here (no MONAI there)
    [ -d "$WORK/models" ] && (cd "$WORK" && tar czf "$OUT/validation_predictions.tar.gz" \
        models/*/fold_0/validation/*.nii.gz 2>/dev/null)
    [ -s "$OUT/acdc.jsonl" ] && "$PYTHON" -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f\"{r['run']:45s} validation {r['validation_dice_mean']:.4f}  train {r['train_seconds']} s\")" "$OUT/acdc.jsonl"
}
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; finish; exit 143' TERM INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
finish
exit $status
