"""Interrupted and resumed runs give the results of a clean run (issue 17, "Verify").

The smallest useful dataset: simulated, 2 participants at 8 mm, ``--n-null 50 --n-atoms 8``.
Every run is a separate ``bids_llm_encode`` process (the interruption is a ``kill -9`` of
the main process). Results are compared with ``scripts/output_checksums.py``: every TSV's
bytes and every statmap's data array.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# reports are neither tables nor maps: left out to keep the test short
ARGS = ["--n-null", "50", "--n-atoms", "8", "--nprocs", "2", "--no-reports"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}


def _checksums(out: Path) -> dict[str, str]:
    spec = importlib.util.spec_from_file_location(
        "output_checksums", ROOT / "scripts" / "output_checksums.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {k: v for k, v in module.checksums(out).items() if not k.startswith("log/")}


def _command(ds: Path, out: Path, work: Path, level: str) -> list[str]:
    return [sys.executable, "-m", "bids_llm_encode.cli.run", str(ds), str(out), level,
            "-w", str(work), *ARGS]


def _run(ds, out, work, level="participant"):
    proc = subprocess.run(_command(ds, out, work, level), capture_output=True, text=True,
                          env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and "log" not in p.parts
                  and p.name != "dataset_description.json")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    from bids_llm_encode.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("interrupted") / "ds"
    simulate_dataset(root, n_participants=2, resolution=8, progress=False)
    return root


@pytest.fixture(scope="module")
def clean(simulated, tmp_path_factory):
    """A clean participant run: (out, work, its checksums)."""
    base = tmp_path_factory.mktemp("clean")
    out, work = base / "out", base / "work"
    _run(simulated, out, work)
    sums = _checksums(out)
    assert any(k.endswith("_statmap.nii.gz") for k in sums)
    assert any(k.endswith("_networks.tsv") for k in sums)
    return out, work, sums


@pytest.mark.slow
def test_interrupted_and_deleted_reruns_match_a_clean_run(simulated, clean, tmp_path):
    """kill -9 of the main process during encoding, then a rerun with the same -w; and a
    run whose outputs were deleted, rerun: both give the clean run's tables and maps."""
    out_clean, work_clean, expected = clean

    # 1. interrupted during encoding, resumed with the same -w
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(_command(simulated, out, work, "participant"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    encoding = []
    while time.time() < deadline and proc.poll() is None:
        encoding = [d for d in work.glob("bids_llm_encode_wf/encode_*") if d.is_dir()]
        if encoding:
            break
        time.sleep(0.05)
    assert encoding, "the run ended or timed out before encoding started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    unfinished = [d for d in encoding if not list(d.glob("result_*.pklz"))]
    assert unfinished, "encoding had already finished when the run was killed"
    _run(simulated, out, work)
    assert _checksums(out) == expected

    # 2. every output of the clean run deleted, rerun with the same -w
    written = _outputs(out_clean)
    for path in written:
        path.unlink()
    _run(simulated, out_clean, work_clean)
    assert not [str(p) for p in written if not p.exists()]
    assert _checksums(out_clean) == expected


@pytest.mark.slow
def test_deleted_group_outputs_rewritten_on_rerun(simulated, clean):
    """The group step (cached by nipype) runs again when a group/ file it wrote is gone."""
    out, work, _ = clean
    _run(simulated, out, work, "group")
    group = sorted(p for p in (out / "group").rglob("*") if p.is_file())
    tables = [p for p in group if p.name.endswith(".tsv")]
    maps = [p for p in group if p.name.endswith("_statmap.nii.gz")]
    assert tables and maps
    before = _checksums(out)
    deleted = [tables[0], maps[0]]
    for path in deleted:
        path.unlink()
    _run(simulated, out, work, "group")
    assert all(p.exists() for p in deleted)
    assert _checksums(out) == before
