#!/usr/bin/env bash
# The peers of `python -m benchmarks.run`:
#  - Tunix: its own virtual environment .bench/venv-tunix (the runner's default
#    --tunix-python) from requirements-bench.txt;
#  - plain JAX: jaxpost's own environment (requirements.txt);
#  - torch + HF and TRL: the current python, from requirements-parity.txt (torch==2.13.0
#    resolves to the CPU build where pip's find-links hold it; pass --torch to install).
# Usage: bash benchmarks/setup_peers.sh [--torch] [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=0
if [[ "${1:-}" == "--torch" ]]; then TORCH=1; shift; fi
VENV=${1:-.bench/venv-tunix}
PY=${PYTHON:-python3}
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -r requirements-bench.txt
"$VENV/bin/python" -c "import tunix, jax; print('tunix venv ok:', jax.__version__)"
if [[ $TORCH == 1 ]]; then
  "$PY" -m pip install -q -r requirements-parity.txt
fi
echo "run: python -m benchmarks.run --tunix-python $VENV/bin/python"
