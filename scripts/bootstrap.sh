#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: Python >= 3.10, torch + torchvision,
# torchattacks, foolbox and the rest of pyproject.toml, plus the test extras. Safe to run again: it reinstalls only
# when pyproject.toml changed. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "bootstrap: $PYTHON is $("$PYTHON" --version 2>&1); dsn-robustness needs Python >= 3.10" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  echo "bootstrap: installing dsn-robustness and its dependencies into $VENV (torch is large: a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[test]'
  "$VENV/bin/python" -c 'import torch, torchvision, torchattacks, foolbox, pandas, pyarrow, scipy, matplotlib, jinja2, tqdm'
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
