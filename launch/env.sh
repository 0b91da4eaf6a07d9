# usage: source "$(dirname "${BASH_SOURCE[0]}")/env.sh"   (from the other launch scripts)
#
# Sourced by the launch scripts: the repository's .venv comes first on PATH (no need to activate it; without one,
# e.g. in the cluster image, PATH is used as it is), and `absolute P` prints P made absolute against the caller's
# directory when it exists there (else P unchanged: the scripts cd to the repository root, so it is read from there).
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -d "$repo/.venv/bin" ]; then export PATH="$repo/.venv/bin:$PATH"; fi
absolute() { if [ -e "$1" ]; then echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; else echo "$1"; fi; }
need() { command -v "$1" >/dev/null || { echo "$1 not found: run 'bash launch/setup-env.sh' in $repo first" >&2; exit 1; }; }
