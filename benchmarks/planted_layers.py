"""Planted layers through the whole app, over seeds and layer ranges (issue 15).

    python benchmarks/planted_layers.py [--ranges 20:24 15:19] [--seeds 0 1 2 3]
        [--participants 3] [--alignment ../shared/.../align.csv] [--baseline]

Per (range, seed): ``simulate_dataset(planted=DefaultA:+,Language:-, planted_layers=range)``
on an 8 mm grid, then ``bids_llm_encode ... participant`` and ``group`` (fresh processes,
``--n-null 300``), then one line from ``group/*_layers.tsv``: whether each network is
labelled at the group level, its layer-test p, the raw peak layer, the most enriched layer
(against random atom sets) and the planted range's share of its distribution against the
all-atoms share. DefaultA's ANs come from the range, Language's from every layer (the
negative control: the draw whose course all layers carry most alike).

Baseline (``--baseline``, in the same run): the simulator's draws replaced by what
``--planted-layers`` did before: 64 ANs at random from the range for DefaultA, 64 at random
from every layer for Language. About 1 min per line on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_draw(X, layer, varying, layer_range, size, seed=0):
    """The baseline: ``size`` ANs drawn at random from the range (no specificity)."""
    pool = varying[np.isin(layer[varying], np.arange(layer_range[0], layer_range[1] + 1))]
    rng = np.random.default_rng(1000 + seed)
    return np.sort(rng.choice(pool, size, replace=False)), None


def _profile_r(rows: pd.DataFrame, net: dict) -> float:
    """Pearson r of the app's per-layer enrichment with the ground truth's course profile
    (mean r^2 of the planted course with each layer's ANs; NaN without one)."""
    prof = net.get("layer_profile")
    if not prof:
        return float("nan")
    return float(np.corrcoef(rows["enrichment"].to_numpy(float), np.asarray(prof))[0, 1])


def one_run(root: Path, layers: str, seed: int, participants: int, alignment, baseline: bool):
    import bids_llm_encode.simulate as simulate

    original = simulate._layer_specific_ans, simulate._layer_neutral_ans
    if baseline:
        simulate._layer_specific_ans = lambda *a: random_draw(*a, seed=seed)
        simulate._layer_neutral_ans = lambda Zv, code, varying, size, rng: (
            np.sort(rng.choice(varying, size, replace=False)), None)
    try:
        simulate.simulate_dataset(root / "bids", n_participants=participants, resolution=8,
                                  planted=("DefaultA:+", "Language:-"), planted_layers=layers,
                                  seed=seed, alignment=alignment, progress=False)
    finally:
        simulate._layer_specific_ans, simulate._layer_neutral_ans = original
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    for level in ("participant", "group"):
        subprocess.run([sys.executable, "-m", "bids_llm_encode.cli.run", str(root / "bids"),
                        str(root / "out"), level, "-w", str(root / "work"), "--n-null", "300",
                        "--nprocs", "2", "--no-reports"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    truth = json.loads((root / "bids" / "sourcedata" / "ground_truth.json").read_text())
    found = sorted((root / "out" / "group").glob("*_layers.tsv"))
    table = pd.read_csv(found[0], sep="\t") if found else pd.DataFrame(columns=["network"])
    lo, hi = map(int, layers.split(":"))
    spec = truth["networks"][0].get("layer_specificity") or {}
    cells = [f"{layers:>6} seed {seed}",
             f"r2 in/out {spec.get('r2_inside', float('nan')):.3f}/"
             f"{spec.get('r2_outside', float('nan')):.3f}"]
    for i_net, net in enumerate(("DefaultA", "Language")):
        d = table[table["network"] == net].sort_values("layer")
        if not len(d):
            cells.append(f"{net}: not labelled")
            continue
        inside = d["layer"].between(lo, hi)
        cells.append(
            f"{net}: p={d['p'].iloc[0]:.3f} peak={int(d['layer'].iloc[d['distribution'].argmax()])}"
            f" enriched={int(d['layer'].iloc[np.nanargmax(d['enrichment'].to_numpy())])}"
            f" range share {d.loc[inside, 'distribution'].sum():.3f}/"
            f"{d.loc[inside, 'distribution_all'].sum():.3f}"
            f" r(enrichment, course profile)={_profile_r(d, truth['networks'][i_net]):.2f}")
    print(" | ".join(cells), flush=True)


def _layer_range(text: str) -> str:
    lo, sep, hi = text.partition(":")
    if not (sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
        raise argparse.ArgumentTypeError(f"{text!r} is not LO:HI (0-based layers, LO <= HI)")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranges", nargs="+", default=["20:24"], type=_layer_range,
                    metavar="LO:HI", help="layer ranges to plant (default: 20:24)")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    ap.add_argument("--participants", type=int, default=3)
    ap.add_argument("--alignment", type=Path, default=None,
                    help="a Gentle alignment (default: the shipped story)")
    ap.add_argument("--baseline", action="store_true",
                    help="also run the random draw from the range, as the baseline")
    args = ap.parse_args(argv)
    draws = [False, True] if args.baseline else [False]
    for baseline in draws:
        print("draw:", "random from the range (baseline)" if baseline
              else "most specific course of the range (--planted-layers)")
        for layers in args.ranges:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
                    one_run(Path(tmp), layers, seed, args.participants, args.alignment,
                            baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
