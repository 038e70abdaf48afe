"""Real-scale benchmark: one simulated scan at native resolution, end to end.

    python benchmarks/scale.py [--story tunnel|21styear] [--resolution 3] [--device cpu]
                               [--n-null 1000] [--nprocs 2] [--keep DIR]

Builds the scan a new user would (``bids_llm_encode_simulate ds --task <story>
--participants 1 --resolution 3 --alignment ../shared/narratives/stimuli/gentle/<story>/
align.csv``; tunnel: 1,020 TRs, ~70k mask voxels), runs ``bids_llm_encode ... participant``
in a fresh process, and prints per node the seconds (nipype's runtime) and the peak RSS
each interface recorded (``peak_rss.json`` in the node folder; see interfaces/base.py).

Baseline named in the same run: the GEMM bound of the encoding's work, measured on this
machine right after the run with the real shapes (T TRs, p = atoms + nuisance features,
V voxels): the issue's count of 5 outer x (3 inner + refit) x 5 band ratios = 100 pairs of
``X' Y`` (p x T by T x V) and ``X (X' Y)``, timed as plain float32 numpy GEMMs with the
node's thread count. Printed: encoding / bound, labels / encoding, whole run, the largest
node peak RSS, against the issue's targets (<= 3x, <= 2x, <= 180 s, <= 6 GB).

``--fsaverage6``: the simulator writes volumes only (no fsaverage6 GIFTI), so this option
reports that and stops; ``--story 21styear`` needs its Gentle alignment under ../shared.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GENTLE = ROOT.parent / "shared" / "narratives" / "stimuli" / "gentle"


def node_records(work: Path) -> dict[str, dict]:
    out = {}
    for res in sorted(work.glob("bids_llm_encode_wf/*/result_*.pklz")):
        with gzip.open(res) as f:
            r = pickle.load(f)
        rec = {"seconds": float(getattr(r.runtime, "duration", 0.0) or 0.0)}
        rss = res.parent / "peak_rss.json"
        if rss.exists():
            rec.update(json.loads(rss.read_text()))
        out[res.parent.name] = rec
    return out


def gemm_bound(T: int, p: int, V: int, threads: int, pairs: int = 100) -> tuple[float, float]:
    """Seconds of ``pairs`` x (X'Y, X W) float32 GEMMs of the real shapes (best of 3)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    X = rng.standard_normal((T, p), dtype=np.float32)
    Y = rng.standard_normal((T, V), dtype=np.float32)
    best = np.inf
    with threadpool_limits(limits=threads, user_api="blas"):
        for _ in range(3):
            t = time.perf_counter()
            W = X.T @ Y
            P = X @ W
            best = min(best, time.perf_counter() - t)
            del W, P
    return pairs * best, best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--story", default="tunnel")
    ap.add_argument("--resolution", type=int, default=3)
    ap.add_argument("--alignment", type=Path, default=None)
    ap.add_argument("--n-null", type=int, default=1000)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--fsaverage6", action="store_true")
    ap.add_argument("--keep", type=Path, default=None, help="keep data and work here")
    args = ap.parse_args()
    if args.fsaverage6:
        print("fsaverage6: bids_llm_encode_simulate writes volumes only; no fsaverage6 scan "
              "can be built here (run participant on a real fsaverage6 scan instead)")
        return 2
    align = args.alignment or GENTLE / args.story / "align.csv"
    if not align.exists():
        print(f"no Gentle alignment for {args.story} at {align}")
        return 2
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="ble-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t = time.time()
        subprocess.run(["bids_llm_encode_simulate", str(tmp / "bids"), "--task", args.story,
                        "--participants", "1", "--resolution", str(args.resolution),
                        "--alignment", str(align)], check=True)
        print(f"simulated {args.story} at {args.resolution} mm in {time.time() - t:.0f} s")
        t = time.time()
        code = subprocess.call([sys.executable, "-m", "bids_llm_encode.cli.run",
                                str(tmp / "bids"), str(tmp / "out"), "participant",
                                "-w", str(tmp / "work"), "--n-null", str(args.n_null),
                                "--nprocs", str(args.nprocs), "--device", args.device])
        wall = time.time() - t
        if code != 0:
            print(f"participant failed ({code})")
            return 1
        nodes = node_records(tmp / "work")
        print(f"participant: {wall:.1f} s wall (includes process start and model load)")
        print(f"    {'node':58s} {'s':>7s} {'peak RSS MB':>12s}")
        for name, rec in sorted(nodes.items(), key=lambda kv: -kv[1]["seconds"]):
            print(f"    {name:58s} {rec['seconds']:7.1f} {rec.get('peak_rss_mb', float('nan')):12.0f}")
        enc_dir = next((tmp / "work").glob("bids_llm_encode_wf/encode_*"))
        with np.load(enc_dir / "encoding.npz") as z:
            k, V = z["coefs"].shape
            m = z["nuisance"].shape[1] if "nuisance" in z.files else 0
        T = int(np.load(next((tmp / "work").rglob("atoms.npy"))).shape[0])
        p = k + m
        bound, one = gemm_bound(T, p, V, threads=min(args.nprocs, 8))
        enc = sum(r["seconds"] for n, r in nodes.items() if n.startswith("encode_"))
        lab = sum(r["seconds"] for n, r in nodes.items() if n.startswith("label_"))
        peak = max((r.get("peak_rss_mb", 0.0) for r in nodes.values()), default=0.0)
        print(f"shapes: T={T} TRs, p={p} features, V={V} voxels; one X'Y + X W pair "
              f"{one:.3f} s; GEMM bound (100 pairs) {bound:.1f} s")
        print(f"encoding {enc:.1f} s = {enc / bound:.2f} x bound (target <= 3); labels "
              f"{lab:.1f} s = {lab / max(enc, 1e-9):.2f} x encoding (target <= 2); whole run "
              f"{wall:.0f} s (target <= 180); largest node peak RSS {peak:.0f} MB "
              "(target <= 6144)")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
