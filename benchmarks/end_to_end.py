"""End-to-end benchmark: one pieman-sized participant cold, then a second one warm.

    python benchmarks/end_to_end.py [--resolution 4] [--alignment ../shared/.../align.csv]

Simulates a 2-participant dataset on the real pieman word alignment (957 words) when
../shared is present (else the shipped story), on a 4 mm grid, then runs
``bids_llm_encode ... participant`` (a fresh process each) for sub-001 with an empty work dir (cold: model load,
extraction, dictionary, encoding, labels) and for sub-002 with the same work dir (warm:
the stimulus branch is reused). Baseline named in the same run: the cold run itself —
the warm/cold ratio is printed, with the targets (cold < 300 s, warm < 60 s on 2 cores)
and the share of time per node.
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _runlog import print_null_costs, run_teed  # noqa: E402

PIEMAN = ROOT.parent / "shared" / "narratives" / "stimuli" / "gentle" / "pieman" / "align.csv"


def node_times(work: Path) -> dict[str, float]:
    out = {}
    for res in sorted((work / "bids_llm_encode_wf").glob("*/result_*.pklz")):
        with gzip.open(res) as f:
            r = pickle.load(f)
        out[res.parent.name] = float(getattr(r.runtime, "duration", 0.0) or 0.0)
    return out


def main() -> int:
    from bids_llm_encode.simulate import simulate_dataset

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resolution", type=int, default=4)
    ap.add_argument("--alignment", type=Path, default=PIEMAN if PIEMAN.exists() else None)
    ap.add_argument("--n-null", type=int, default=1000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ble-bench-"))
    try:
        t = time.time()
        truth = simulate_dataset(tmp / "bids", n_participants=2, resolution=args.resolution,
                                 alignment=args.alignment, progress=False)
        print(f"simulated {truth['n_trs']} TRs at {args.resolution} mm in {time.time() - t:.0f} s")
        common = ["-w", str(tmp / "work"), "--n-null", str(args.n_null), "--no-reports"]
        timings = {}
        for label, sub in (("cold", "001"), ("warm", "002")):
            before = node_times(tmp / "work") if (tmp / "work").exists() else {}
            t = time.time()
            # a fresh process per participant, as a user's (or a cluster job's) run
            code, null_lines = run_teed([sys.executable, "-m", "bids_llm_encode.cli.run",
                                         str(tmp / "bids"), str(tmp / "out"), "participant",
                                         "--participant-label", sub, *common])
            timings[label] = time.time() - t
            assert code == 0, f"{label} run failed ({code})"
            nodes = {k: v for k, v in node_times(tmp / "work").items() if k not in before}
            total = sum(nodes.values()) or 1.0
            print(f"{label}: {timings[label]:.1f} s wall; per node:")
            for name, sec in sorted(nodes.items(), key=lambda kv: -kv[1]):
                print(f"    {name:55s} {sec:7.1f} s  {100 * sec / total:5.1f} %")
            print_null_costs(null_lines)
        print(f"cold {timings['cold']:.1f} s (target < 300 s); warm {timings['warm']:.1f} s "
              f"(target < 60 s); warm/cold ratio {timings['warm'] / timings['cold']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
