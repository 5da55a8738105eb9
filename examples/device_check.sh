#!/usr/bin/env bash
# The GPU check: the CUDA tests (tests/test_cuda.py) and the cost benchmark (examples/benchmark_cost.py:
# nnU-Net's step vs BCP stage 2 on MSD Hippocampus 3d_fullres, nnU-Net's own plans and batch size; the paper's loss,
# --bcp bcp_labeled_loss_weight=0, then the plugin's defaults, whose supervised term adds a second pass of the labeled
# patches, each with its peak CUDA memory; COST_SETTINGS="NAME=VALUE ..." times one configuration instead), then an
# optional
# extra command with the time that is left. Made for the device tool's machines: PyTorch but no nnU-Net, no network,
# at most 64 MiB carried per call, 10 minutes per command, 15 minutes of device time per session.
#
# BEFORE (here, once; the folders are ignored through .git/info/exclude: /.whl/ /.whl-big/ /.device/)
#   1. Wheels (cp312, manylinux x86-64) of what the device image lacks, into .whl/ (versions as in .venv):
#        P="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
#           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
#        python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl \
#          nnunetv2==2.8.1 simpleitk==2.5.7 nibabel==5.4.2 blosc2==4.14.1 ndindex==1.10.1 numexpr==2.14.2 \
#          connected-components-3d==4.1.1 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
#          dynamic_network_architectures==0.4.4 yacs==0.1.8 graphviz==0.21 timm==1.0.22
#        python -m pip wheel --no-deps -w .whl acvl_utils==0.2.6      # sdist only: a pure-Python wheel
#      SimpleITK's wheel (52.8 MB) does not fit beside the rest; repack its installed files with xz (28.9 MB):
#        mkdir -p .whl-big && mv .whl/simpleitk-*.whl .whl-big/ && d=$(mktemp -d) && unzip -q .whl-big/simpleitk-*.whl -d $d
#        tar cf - -C $d . | xz -6 -T2 > .whl/simpleitk-2.5.7-site.tar.xz
#      Everything else nnU-Net imports is in the device image (numpy, scipy, scikit-image, pandas, einops, ...); timm
#      is there too, but dynamic_network_architectures wants timm<1.0.23 and nnUNetv2_train's trainer search imports
#      its Primus models, so 1.0.22 travels (2.5 MB).
#   2. Data (7 MB): MSD Hippocampus planned and preprocessed by nnU-Net (plans from all cases), 30 of its cases:
#        python examples/benchmark_label_scarce.py prepare --msd ../shared/data/Task04_Hippocampus -w .device/bench
#        python examples/device/make_cost_data.py -i .device/bench/nnUNet_preprocessed/Dataset604_Hippocampus -o .device/data
#      To time a ResEnc plans beside nnUNetPlans (on Hippocampus it shares their preprocessed data), after
#        nnUNetv2_plan_experiment -d 604 -pl nnUNetPlannerResEncM
#        nnUNetv2_preprocess -d 604 -plans_name nnUNetResEncUNetMPlans -c 3d_fullres -np 1   (nnUNet_* of .device/bench)
#      add -p nnUNetPlans nnUNetResEncUNetMPlans, and time them with COST_PLANS="nnUNetPlans nnUNetResEncUNetMPlans"
#   3. Dry run here (writes to .device/out; the CUDA tests skip; slow on 2 cores):
#        bash examples/device_check.sh --device cpu --python .venv/bin/python --iterations 2 --site .device/site-dry \
#          --budget 1500 --cost-cap 1200 -- echo extra
#
# THE CALL (one; about 55.7 MB of the 67.1 MB (64 MiB) travels: .whl 48.0 MB, .device/data 7.2 MB, the tree 0.5 MB)
#   run(command="bash examples/device_check.sh", carry=[".whl", ".device/data"], timeout_s=450)
# The cost benchmark first (at most 150 s), then the CUDA tests (at most 240 s), 430 s in all (--budget): a warm
# rerun of a part (--skip-tests / --skip-cost) still fits the 15 minutes.
# It prints as it goes and writes to $OUT: env.txt, cost.log, cost.jsonl, cuda_tests.log, cuda_tests.xml (junit)
# (one JSON line: seconds/iteration and peak CUDA memory of both trainers, their ratios, the BCP breakdown with the
# largest-component filter's share, the filter on 2x128^3, the data waiting), extra.log. Append $OUT/cost.jsonl to
# examples/results/cost.jsonl here. Compile: the cost benchmark runs eager (nnUNet_compile=f; compiling both trainers
# would take minutes of the budget); the compiled path is covered by one CUDA test on a tiny network. The compiled
# step, as nnU-Net trains on CUDA by default (student and teacher compiled; rows say "compiled": true), in a warm call:
#   nnUNet_compile=t bash examples/device_check.sh --skip-tests --cost-cap 280 --budget 580   (compile time not measured)
#
# AN EXTRA COMMAND gets what is left of --budget (default 430 s of the call's timeout_s), e.g. a short label-scarce
# protocol. Its work dir (.device/bench: 57.9 MB) does not fit beside the wheels: carry it in a second call chained
# within the 30 s the machine stays warm; the first call's installation in .device/site stays there:
#   run(command="bash examples/device_check.sh --skip-tests --skip-cost --budget SECONDS_LEFT -- python \
#        examples/benchmark_label_scarce.py protocol -w .device/bench ... --device cuda", carry=[".device/bench"],
#       timeout_s=<device seconds left, at most 600>)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DEVICE=cuda PYTHON=python3 ITERATIONS=20 BUDGET=430 SKIP_TESTS=0 SKIP_COST=0 TESTS_CAP=240 COST_CAP=150
WHEELS=.whl SITE=.device/site DATA=.device/data
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --iterations) ITERATIONS=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;           # seconds this script may take in all
        --site) SITE=$2; shift 2 ;;
        --data) DATA=$2; shift 2 ;;
        --tests-cap) TESTS_CAP=$2; shift 2 ;;    # seconds at most for the CUDA tests (default 240)
        --cost-cap) COST_CAP=$2; shift 2 ;;      # and for the cost benchmark (default 150)
        --skip-tests) SKIP_TESTS=1; shift ;;
        --skip-cost) SKIP_COST=1; shift ;;
        --) shift; break ;;
        *) echo "unknown argument $1 (see the header of $0)"; exit 2 ;;
    esac
done
EXTRA=("$@")
case $PYTHON in */*) PYTHON=$(realpath -s "$PYTHON") ;; esac  # the tests run from tests/
START=$SECONDS
OUT=${OUT:-$REPO/.device/out}
mkdir -p "$OUT"
left() { echo $((BUDGET - (SECONDS - START))); }
# a phase's time limit: its own cap, or what is left of the budget minus a reserve for the phases after it
limit() { local cap=$1 reserve=$2 rest; rest=$(( $(left) - reserve )); [ "$rest" -lt "$cap" ] && cap=$rest; echo $cap; }
phase() { echo; echo "=== $* ($(left) s of the budget left)"; }

export nnUNet_def_n_proc=${nnUNet_def_n_proc:-8} nnUNet_compile=${nnUNet_compile:-f} PYTHONUNBUFFERED=1

# ------------------------------------------------------------------ install what the device lacks into $SITE
phase "install"
if [ ! -f "$SITE/.installed" ]; then
    rm -rf "$SITE" && mkdir -p "$SITE"
    # --python-version: the same wheel set is checked here (Python 3.11) as is installed there (3.12)
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        --only-binary=:all: --python-version 3.12 --implementation cp "$WHEELS"/*.whl || exit 1
    tar xJf "$WHEELS"/simpleitk-*-site.tar.xz -C "$SITE" || exit 1
    touch "$SITE/.installed"
fi
# the plugin itself from this tree, every call (the tree may have changed): copied, with its console scripts written
# from pyproject.toml, so that no build backend of the device's own (whatever its setuptools version) is involved
rm -rf "$SITE/plugin" && mkdir -p "$SITE/plugin/bin" && cp -r nnunetv2_bcp "$SITE/plugin/" || exit 1
$PYTHON - "$SITE/plugin/bin" <<'PY' || { echo "writing the plugin's console scripts failed"; exit 1; }
import os, sys, tomllib
scripts = tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"]
for name, target in scripts.items():
    module, function = target.split(":")
    path = os.path.join(sys.argv[1], name)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    os.chmod(path, 0o755)
PY
if [ "$($PYTHON -c 'import sys; print(sys.version_info[:2] == (3, 12))')" = True ]; then
    export PYTHONPATH=$REPO/$SITE/plugin:$REPO/$SITE PATH=$REPO/$SITE/plugin/bin:$REPO/$SITE/bin:$PATH
else  # the dry run here: the wheels are cp312; this interpreter's own environment has their cp311 builds
    echo "$PYTHON is not Python 3.12: wheels installed into $SITE only to check the set; running on its own packages"
    export PYTHONPATH=$REPO
fi
export nnUNet_extTrainer=$($PYTHON -c "import nnunetv2_bcp; print(nnunetv2_bcp.ext_trainer_dir())")
{
    echo "device $DEVICE, $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
    $PYTHON -c "import sys, torch, nnunetv2, SimpleITK, blosc2, cc3d, nibabel, timm, nnunetv2_bcp.training.nnUNetTrainerBCP as t
import dynamic_network_architectures.architectures.primus  # what nnUNetv2_train's trainer search imports
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
print('SimpleITK', SimpleITK.Version_VersionString(), 'blosc2', blosc2.__version__, 'timm', timm.__version__,
      'plugin from', t.__file__)" \
        || { echo "imports failed"; exit 1; }
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
} 2>&1 | tee "$OUT/env.txt" || exit 1

# ------------------------------------------------------------------ cost benchmark on Hippocampus
if [ "$SKIP_COST" = 0 ]; then
    phase "cost benchmark"
    dataset=$(ls "$DATA/nnUNet_preprocessed")
    # the paper's loss, then the plugin's defaults (an empty setting), each beside nnU-Net's own step; COST_SETTINGS
    # ("NAME=VALUE ...") times one configuration instead; COST_PLANS ("nnUNetPlans nnUNetResEncUNetMPlans") the plans,
    # each in the data (make_cost_data.py -p)
    if [ -n "${COST_SETTINGS+set}" ]; then RUNS=("$COST_SETTINGS"); else RUNS=("bcp_labeled_loss_weight=0" ""); fi
    for plans in ${COST_PLANS:-nnUNetPlans}; do
        for run_settings in "${RUNS[@]}"; do
            COST=()
            for setting in $run_settings; do COST+=(--bcp "$setting"); done
            work=$(mktemp -d)
            echo "cost: $plans, BCP with ${run_settings:-the plugin defaults}" | tee -a "$OUT/cost.log"
            # no nnUNet_raw: training reads only the preprocessed data
            env -u nnUNet_raw nnUNet_preprocessed=$REPO/$DATA/nnUNet_preprocessed nnUNet_results=$work/results \
                timeout "$(limit "$COST_CAP" 150)" $PYTHON examples/benchmark_cost.py -d "$dataset" -c 3d_fullres \
                -p "$plans" --device "$DEVICE" --iterations "$ITERATIONS" --data-wait-iterations "$ITERATIONS" \
                --filter-shape 128 128 128 --repeats 1 "${COST[@]}" -o "$OUT/cost.jsonl" 2>&1 | tee -a "$OUT/cost.log"
            echo "cost benchmark ($plans, ${run_settings:-defaults}): exit status ${PIPESTATUS[0]}"
        done
    done
fi

# ------------------------------------------------------------------ CUDA tests
if [ "$SKIP_TESTS" = 0 ]; then
    phase "CUDA tests"
    (cd tests && timeout "$(limit "$TESTS_CAP" 5)" $PYTHON -m pytest -rs -v -p no:cacheprovider test_cuda.py \
        --junitxml="$OUT/cuda_tests.xml") 2>&1 | tee "$OUT/cuda_tests.log"
    echo "CUDA tests: exit status ${PIPESTATUS[0]}"
fi

# ------------------------------------------------------------------ the extra command, with the time left
if [ ${#EXTRA[@]} -gt 0 ]; then
    phase "extra: ${EXTRA[*]}"
    timeout "$(limit 100000 5)" "${EXTRA[@]}" 2>&1 | tee "$OUT/extra.log"
    echo "extra command: exit status ${PIPESTATUS[0]}"
fi
echo; echo "done in $((SECONDS - START)) s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
