"""Numeric plumbing shared by the stages: device choice, thread budgets, z-scoring, and
the process's memory readings."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from .errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda[:N]' only when there is one."""
    import torch

    dev = str(device).lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" or dev.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} was asked for but torch sees no CUDA GPU; "
                             "use --device cpu")
        return dev
    if dev == "cpu":
        return dev
    raise UsageError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


def cpu_threads() -> int:
    """Cores this process may use (affinity), capped by OMP_NUM_THREADS when it is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return max(1, n)


@contextmanager
def thread_budget(n: int | None):
    """BLAS (threadpoolctl), torch and scipy.fft threads limited to ``n`` inside the block,
    restored after; ``None`` leaves them as they are."""
    if n is None:
        yield
        return
    if int(n) < 1:
        raise UsageError(f"thread count must be >= 1, not {n!r}")
    import scipy.fft
    import torch
    from threadpoolctl import threadpool_limits

    n = int(n)
    before = torch.get_num_threads()
    # scipy.fft is single-threaded unless told (the shift null's FFTs)
    with threadpool_limits(limits=n), scipy.fft.set_workers(n):
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def zscore_columns(X, rows=None, apply=None, dtype=np.float32):
    """z-score every column over time with the statistics of ``rows`` (all rows if None;
    population std; constant columns are centred, not scaled).

    Returns ``(X[rows], X[apply])`` z-scored; ``apply`` rows (a test fold) are scaled with
    the statistics of ``rows``, never their own (None when no ``apply`` rows are given).
    """
    Xt = np.array(X if rows is None else X[rows], dtype=dtype)
    mean = Xt.mean(0, dtype=np.float64).astype(dtype)
    Xt -= mean
    std = np.sqrt(np.einsum("ij,ij->j", Xt, Xt).astype(np.float64) / Xt.shape[0])
    std[~(std > 0)] = 1.0
    inv = (1.0 / std).astype(dtype)
    Xt *= inv
    if apply is None:
        return Xt, None
    Xa = np.array(X[apply], dtype=dtype)
    Xa -= mean
    Xa *= inv
    return Xt, Xa


def status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM...); None where not available."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5), so a MultiProc worker that
    ran other nodes before reports this node's own peak; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


#: Per-node resource record the interfaces write into each node's folder.
PEAK_RSS_JSON = "peak_rss.json"


def read_peak_rss(work_dir, since: float = 0.0) -> list[dict]:
    """Every node's resource record (``peak_rss.json``: peak RSS, children's, seconds)
    under ``work_dir`` written at or after ``since``, with the node's name added."""
    import json
    from pathlib import Path

    records = []
    for path in sorted(Path(work_dir).rglob(PEAK_RSS_JSON)):
        try:
            if path.stat().st_mtime < since:
                continue
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rec["node"] = path.parent.name
        records.append(rec)
    return records
