"""Real-scale benchmark: one simulated scan at native resolution, end to end.

    python benchmarks/scale.py [--story tunnel|21styear] [--resolution 3] [--device cpu]
                               [--n-null 1000] [--nprocs 2] [--keep DIR]
                               [--fsaverage6] [--null shift|spin] [--trs N]

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

``--fsaverage6``: the same story simulated with ``--space fsaverage6`` (Narratives'
``..._space-fsaverage6_hemi-{L,R}_desc-clean.func.gii``, 2 x 40,962 vertices; the volumes
the simulator also writes are at 8 mm unless --resolution is given) and ``participant
--space fsaverage6``. For ``--null spin`` the app needs the fsaverage6 sphere, which is
not available offline: STAND-IN spheres (Fibonacci points, 40,962 per hemisphere, saved
under TemplateFlow's names in a temporary $TEMPLATEFLOW_HOME) are written, so the spin
null's timing is representative but its p-values are not anatomical.

``--story 21styear``: ../shared holds no 21styear alignment, so a STAND-IN is built: the
available Gentle alignments (the tunnel first, then the others) concatenated with their
times shifted (2 s between stories) and cut where a 2,249-TR scan at TR 1.5 s ends (about
8,000 words). Its words repeat other stories; the timing and the size are 21styear's.

``--trs N``: cut the story so the scan has about N TRs (smoke checks at a tiny size).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _runlog import print_null_costs, run_teed

ROOT = Path(__file__).resolve().parents[1]
GENTLE = ROOT.parent / "shared" / "narratives" / "stimuli" / "gentle"
TR = 1.5  # Narratives; the simulator's default
SIM_TAIL_S = 12.0  # the simulator scans this long after the last word
STANDIN_TRS = {"21styear": 2249}  # stories with no alignment under ../shared: their length
FSAVERAGE6_VERTICES = 40962


def _read_align_csv(path: Path) -> list[list[str]]:
    """Gentle align.csv rows [word, aligned, start, end] (start/end empty when unplaced)."""
    import csv

    with open(path, newline="") as f:
        return [row[:4] + [""] * (4 - len(row[:4])) for row in csv.reader(f) if row]


def build_alignment(sources: list[Path], n_trs: int, out: Path, tr: float = TR) -> dict:
    """Concatenate Gentle align.csv files (times shifted, 2 s between stories) and cut the
    words that end after a scan of ``n_trs`` TRs would (less the simulator's tail). Writes
    ``out`` (Gentle's align.csv format) and returns what went in."""
    end_s = n_trs * tr - SIM_TAIL_S
    rows, used, cursor = [], [], None
    for src in sources:
        story = _read_align_csv(src)
        starts = [float(r[2]) for r in story if r[2]]
        if not starts:
            continue
        shift = 0.0 if cursor is None else cursor + 2.0 - starts[0]
        pending, n_before = [], len(rows)
        for word, aligned, start, stop in story:
            if not start:
                pending.append([word, "", "", ""])
                continue
            a, b = float(start) + shift, float(stop) + shift
            if b > end_s:
                break
            rows += pending + [[word, aligned, f"{a:.3f}", f"{b:.3f}"]]
            pending, cursor = [], b
        else:
            rows += pending
            used.append(src.parent.name)
            continue
        if len(rows) > n_before:
            used.append(src.parent.name + " (cut)")
        break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes("".join(",".join(r) + "\r\n" for r in rows).encode())
    return {"path": str(out), "words": len(rows), "last_word_end_s": cursor,
            "stories": used, "target_trs": n_trs}


def write_standin_spheres(home: Path) -> Path:
    """TemplateFlow-named fsaverage6 spheres made of Fibonacci points: a STAND-IN so the spin
    null runs offline (timing representative; rotations not of the real mesh)."""
    import nibabel as nib

    from bids_llm_encode.networks.spatial_nulls import fibonacci_sphere

    folder = home / "tpl-fsaverage"
    folder.mkdir(parents=True, exist_ok=True)
    xyz = fibonacci_sphere(FSAVERAGE6_VERTICES).astype(np.float32)
    for h in "LR":
        arr = nib.gifti.GiftiDataArray(xyz, intent="NIFTI_INTENT_POINTSET",
                                       datatype="NIFTI_TYPE_FLOAT32")
        nib.save(nib.GiftiImage(darrays=[arr]),
                 str(folder / f"tpl-fsaverage_hemi-{h}_den-41k_sphere.surf.gii"))
    return home


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
    if str(ROOT) not in sys.path:  # node results unpickle app classes; the spheres use it
        sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--story", default="tunnel")
    ap.add_argument("--resolution", type=int, default=None,
                    help="voxel size in mm (default 3; 8 with --fsaverage6, whose volumes "
                    "are only a by-product)")
    ap.add_argument("--alignment", type=Path, default=None)
    ap.add_argument("--n-null", type=int, default=1000)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--fsaverage6", action="store_true",
                    help="simulate and run the fsaverage6 surface scan instead of volumes")
    ap.add_argument("--null", default=None, choices=["shift", "spin"],
                    help="passed to participant (default: the app's); spin needs "
                    "--fsaverage6 and runs on stand-in spheres")
    ap.add_argument("--trs", type=int, default=None,
                    help="cut the story to about this many TRs (smoke checks)")
    ap.add_argument("--keep", type=Path, default=None, help="keep data and work here")
    args = ap.parse_args()
    if args.null == "spin" and not args.fsaverage6:
        ap.error("--null spin needs --fsaverage6 (the spin null rotates surface maps)")
    resolution = args.resolution or (8 if args.fsaverage6 else 3)
    tmp = (args.keep or Path(tempfile.mkdtemp(prefix="ble-scale-"))).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    align = (args.alignment or GENTLE / args.story / "align.csv").resolve()
    if args.alignment is None and (not align.exists() or args.trs):
        if not align.exists() and args.story not in STANDIN_TRS:
            print(f"no Gentle alignment for {args.story} at {align}")
            return 2
        first = [align] if align.exists() else [GENTLE / "tunnel" / "align.csv"]
        sources = first + sorted(p for p in GENTLE.glob("*/align.csv") if p not in first)
        n_trs = args.trs or STANDIN_TRS[args.story]
        info = build_alignment(sources, n_trs, tmp / "standin" / args.story / "align.csv")
        align = Path(info["path"])
        label = "STAND-IN" if args.story in STANDIN_TRS else "cut"
        print(f"{label} alignment for {args.story}: {info['words']} words, last word ends at "
              f"{info['last_word_end_s']:.1f} s (target {n_trs} TRs at TR {TR} s), from "
              f"{', '.join(info['stories'])} (concatenated Gentle alignments, times shifted)")
    sim_space = []
    if args.fsaverage6:
        sim_space = ["--space", "fsaverage6"]
        env["TEMPLATEFLOW_HOME"] = str(write_standin_spheres(tmp / "templateflow"))
        print("fsaverage6: spin-null sphere is a STAND-IN (Fibonacci points under "
              f"{env['TEMPLATEFLOW_HOME']}): timing representative, spin p-values not "
              "anatomical")
    try:
        t = time.time()
        subprocess.run([sys.executable, "-m", "bids_llm_encode.cli.simulate", str(tmp / "bids"),
                        "--task", args.story, "--participants", "1", "--resolution",
                        str(resolution), "--alignment", str(align), *sim_space],
                       check=True, cwd=ROOT, env=env)
        print(f"simulated {args.story} at {resolution} mm"
              f"{' + fsaverage6' if args.fsaverage6 else ''} in {time.time() - t:.0f} s")
        t = time.time()
        code, null_lines = run_teed([sys.executable, "-m", "bids_llm_encode.cli.run",
                                     str(tmp / "bids"), str(tmp / "out"), "participant",
                                     "-w", str(tmp / "work"), "--n-null", str(args.n_null),
                                     "--nprocs", str(args.nprocs), "--device", args.device,
                                     *sim_space,
                                     *(["--null", args.null] if args.null else [])],
                                    cwd=ROOT, env=env)
        wall = time.time() - t
        if code != 0:
            print(f"participant failed ({code})")
            return 1
        nodes = node_records(tmp / "work")
        print(f"participant: {wall:.1f} s wall (includes process start and model load)")
        print(f"    {'node':58s} {'s':>7s} {'peak RSS MB':>12s}")
        for name, rec in sorted(nodes.items(), key=lambda kv: -kv[1]["seconds"]):
            print(f"    {name:58s} {rec['seconds']:7.1f} {rec.get('peak_rss_mb', float('nan')):12.0f}")
        print_null_costs(null_lines)
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
        unit = "vertices" if args.fsaverage6 else "voxels"
        print(f"shapes: T={T} TRs, p={p} features, V={V} {unit}; one X'Y + X W pair "
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
