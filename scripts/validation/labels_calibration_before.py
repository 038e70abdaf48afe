"""Same datasets as benchmarks/calibration.py, labelled by the code before issue 14 (q < .05).

    mkdir -p /tmp/w14a/old && git archive 2180511 bids_llm_encode | tar -x -C /tmp/w14a/old
    python scripts/validation/labels_calibration_before.py 24
"""
import sys
from pathlib import Path

sys.path.insert(0, "/tmp/w14a/old")
sys.path.insert(1, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import numpy as np

import bids_llm_encode

assert bids_llm_encode.__file__.startswith("/tmp/w14a/old"), bids_llm_encode.__file__
from calibration import TRUE, fit, grid, simulate, summarise

from bids_llm_encode.group.statistics import GroupShiftNull, group_labels, group_ttest
from bids_llm_encode.networks import Atlas, ShiftNull, label_atoms


def score(t, planted):
    sig = t[t.q < 0.05]
    keys = set(zip(sig.atom.astype(int), sig.network, sig.direction))
    false = keys - ({TRUE} if planted else set())
    return bool(false), (len(false) / len(keys) if keys else 0.0), (TRUE in keys) if planted else np.nan

_, coords, labels = grid()
atlas = Atlas("blocks", labels, {i: f"N{i}" for i in range(1, 7)})
res = {}
for d in range(int(sys.argv[1])):
    n_part = 3 + d % 6; g_amp = 0.6 if d % 2 else 0.0; plant = ("parcel", "sphere")[(d // 2) % 2]
    for cond in ("none", plant):
        Ys, D = simulate(1000 + d, n_part, cond, g_amp)
        nulls, tabs, coefs = [], [], []
        for Y in Ys:
            nl = ShiftNull(Y, D, np.full(Y.shape[1], 10.0), n_null=100000)
            c = fit(Y, D); t = label_atoms(c, np.ones(Y.shape[1]), [atlas], nl)
            nulls.append(nl); tabs.append(t); coefs.append(c)
            res.setdefault(("participant", cond), []).append(score(t, cond != "none"))
        tm, _ = group_ttest(coefs)
        g = group_labels(tabs, tm, np.ones(tm.shape[1]), [atlas], GroupShiftNull(nulls))
        res.setdefault(("group", cond), []).append(score(g, cond != "none"))
print("| level | condition | units | FWER (any false label) | mean FDP | power (N3+) |")
print("|---|---|---|---|---|---|")
for (lv, c), rows in sorted(res.items()):
    f, fd, pw, n = summarise(rows)
    print(f"| {lv} | {c} | {n} | {f:.3f} | {fd:.3f} | {pw:.3f} |")
