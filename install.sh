#!/usr/bin/env bash
# Create .venv and install DeeperHub with its test dependencies.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
