#!/usr/bin/env bash
# The app's main job on the embedded default data: simulate a Narratives-shaped dataset
# with planted ground truth, then run `participant` and `group` with the bundled model.
set -euo pipefail
out="${1:-demo}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -rf "$out"
# planted: DefaultA + and Language - of the bundled kong2019 atlas (the default --fbn-atlas)
bids_llm_encode_simulate "$out/bids" --participants 4 --planted DefaultA:+,Language:-
bids_llm_encode "$out/bids" "$out/derivatives" participant -w "$out/work"
bids_llm_encode "$out/bids" "$out/derivatives" group -w "$out/work"
echo
echo "derivatives: $out/derivatives  (reports: $out/derivatives/sub-001.html, $out/derivatives/group.html)"
echo "planted:     $out/bids/sourcedata/ground_truth.json"
echo "recovered:   $(ls "$out"/derivatives/group/*_networks.tsv)"
