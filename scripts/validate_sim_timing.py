"""Validation (issue 13, part 1): the simulator's own BOLD timing vs the app's regressors.

Simulates the default dataset (1 participant), then rebuilds each planted signal from the
app's extraction (same ANs) with the new continuous-time regressors and with the old
per-TR-mean * nilearn ``glover_hrf(tr, oversampling=1)`` ones, and prints the correlation
with the planted signal (simulator: its own scipy double gamma, word impulses, mid-TR).

    OMP_NUM_THREADS=1 python scripts/validate_sim_timing.py [TR]
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from nilearn.glm.first_level import glover_hrf

from bids_llm_encode.bids_inputs import read_gentle, words_in_scan_time
from bids_llm_encode.extraction import extract_responses
from bids_llm_encode.simulate import simulate_dataset


def z(x):
    return (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)


tr = float(sys.argv[1]) if len(sys.argv) > 1 else 1.5
with tempfile.TemporaryDirectory() as d:
    truth = simulate_dataset(d, n_participants=1, tr=tr, progress=False)
    words = words_in_scan_time(read_gentle(Path(d) / "stimuli/gentle/pieman/align.json"), 0.0)
res = extract_responses(words, tr, truth["n_trs"], progress=False)
kernel = glover_hrf(tr, oversampling=1, time_length=32.0)
print(f"| TR {tr} network | r(planted, new app regressors) | r(planted, old app regressors) |")
print("|---|---|---|")
for net in truth["networks"]:
    idx = np.asarray(net["an_indices"])
    sig = np.asarray(net["signal"])
    new = z(res.X[:, idx].astype(float)).mean(1)
    old_x = np.stack([np.convolve(c, kernel)[: len(c)] for c in res.X_raw[:, idx].T.astype(float)], 1)
    old = z(old_x).mean(1)
    print(f"| {net['network']} | {np.corrcoef(sig, new)[0, 1]:.4f} | "
          f"{np.corrcoef(sig, old)[0, 1]:.4f} |")
print(json.dumps({"slice_time_ref": truth.get("slice_time_ref"), "n_trs": truth["n_trs"]}))
