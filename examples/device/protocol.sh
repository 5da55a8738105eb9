#!/usr/bin/env bash
# The label-scarce protocol of issue 12 on the GPU machine: per seed the labeled-only model L, then from L (a)
# labeled-only continued, (b) BCP continued, and (b') BCP with the supervised term, all on the GPU at once; beside
# them one BCP run from scratch at K=4 for the stage-1 rule.
# Runs as device_check.sh's extra command (its installation in .device/site must be there: chain this call within
# the 30 s the machine stays warm after device_check.sh's call):
#   run(command="bash examples/device_check.sh --skip-tests --skip-cost --budget 560 -- bash examples/device/protocol.sh",
#       carry=[".device/bench"], timeout_s=590)
# .device/bench is made here with: python examples/benchmark_label_scarce.py prepare --msd ../shared/data/Task04_Hippocampus -w .device/bench
# Results (one JSON line per run, as each lands) and the runs' logs come back in $OUT; append the lines to
# examples/results/hippocampus_label_scarce.jsonl here.
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-.device/bench} SEEDS=${SEEDS:-"0 1 2"} K=${K:-2}
OUT=${OUT:-.device/out}
mkdir -p "$OUT"
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
P=(python3 examples/benchmark_label_scarce.py protocol -w "$WORK" --seeds $SEEDS -k "$K" --device cuda
   --results "$OUT/label_scarce.jsonl")
"${P[@]}" --jobs 6 > "$OUT/protocol_default.log" 2>&1 &
default=$!
# issue 11 item 4: the stage-1 rule, now judged on labeled training patches, on the K=4 set-up whose fixed 8-epoch
# stage 1 once collapsed the posterior class (BCP from scratch; its log shows whether stage 1 was extended)
python3 examples/benchmark_label_scarce.py run -w "$WORK" --arm bcp -k 4 --seed 0 --bcp-pretrain-epochs 8 \
    --device cuda --results "$OUT/label_scarce.jsonl" > "$OUT/stage_rule_k4.log" 2>&1 &
# (b') reuses the L models: start it once they are all there
while kill -0 $default 2>/dev/null && [ "$(ls "$WORK"/models/labeled_k${K}_s*/fold_0/checkpoint_final.pth 2>/dev/null | wc -l)" -lt "$(echo $SEEDS | wc -w)" ]; do
    sleep 5
done
"${P[@]}" --jobs 3 --arms bcp_continue --bcp bcp_labeled_loss_weight=1 > "$OUT/protocol_supervised.log" 2>&1 &
wait
tail -n 3 "$OUT"/protocol_*.log
(cd "$WORK" && tar czf "$OUT/run_logs.tar.gz" *.log *.out 2>/dev/null)
