#!/usr/bin/env bash
# The README's main job: install into ./.venv (if needed) and run the BCP demo on built-in synthetic data.
# Extra arguments go to nnUNetv2_bcp_demo, e.g.: bash examples/demo.sh --msd ../shared/data/Task04_Hippocampus
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/nnUNetv2_bcp_demo ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet .
fi
exec .venv/bin/nnUNetv2_bcp_demo "$@"
