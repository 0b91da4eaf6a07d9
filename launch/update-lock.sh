#!/usr/bin/env bash
# Move to the newest releases on purpose: build .venv-latest with the newest versions pyproject.toml allows, run the
# whole test suite in it, show what changed against requirements.lock, and (with --write) make that the new lock
# when the suite passed. .venv and the lock stay untouched otherwise.
#
# usage: bash launch/update-lock.sh            # try the newest releases: build .venv-latest, run the suite
#        bash launch/update-lock.sh --write    # the same, then write requirements.lock from .venv-latest if green
#        PYTEST_ARGS="-x -q" bash launch/update-lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
write=""
case "${1:-}" in
  "") ;;
  --write) write=1 ;;
  *) echo "usage: bash launch/update-lock.sh [--write]" >&2; exit 2 ;;
esac
bash launch/setup-env.sh test --latest
fresh=$(mktemp)
trap 'rm -f "$fresh"' EXIT
{
  echo "# The exact versions CI tests: launch/setup-env.sh installs these (as pip constraints), torch aside where the"
  echo "# machine brings its own build. Written by 'bash launch/update-lock.sh --write' after the suite passed with them."
  .venv-latest/bin/python -m pip --disable-pip-version-check freeze --exclude-editable --all \
    | grep -viE "^(pip|setuptools|wheel)==" | sed -E "s/^(torch==[^+]*)\+.*/\1/" | LC_ALL=C sort -f
} > "$fresh"
echo "releases that differ from requirements.lock (- lock, + newest):"
diff <(grep -v "^#" requirements.lock) <(grep -v "^#" "$fresh") | grep "^[<>]" | sed "s/^</  -/; s/^>/  +/" || echo "  none"
# shellcheck disable=SC2086
.venv-latest/bin/python -m pytest ${PYTEST_ARGS:--q}
if [ -n "$write" ]; then
  cp "$fresh" requirements.lock
  echo "requirements.lock now holds the releases the suite just passed with; commit it"
fi
