"""What every heavy interface shares: a thread budget equal to the node's ``n_procs``, and
writing its results into the node's folder.

MultiProc runs several nodes at once in workers where numpy/torch are already imported,
so OMP_NUM_THREADS cannot be set any more; without a limit two nodes on two cores would
each start two BLAS threads and slow each other down several times.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, traits

from ..compute import PEAK_RSS_JSON, reset_peak_rss, status_kb, thread_budget
from ..config import LOG_LEVEL_ENV


def _worker_logging() -> None:
    """In a MultiProc worker (no handler anywhere), log the package's messages (e.g. the
    labelling nulls' seconds) to stderr at the CLI's level, in the CLI's format."""
    level = os.environ.get(LOG_LEVEL_ENV)
    pkg = logging.getLogger("bids_llm_encode")
    if not level or logging.getLogger().handlers or pkg.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(level)
    pkg.propagate = False


def _write_peak_rss(cwd, reset: bool, seconds: float) -> None:
    """``peak_rss.json``: the node's peak RSS (MB), its children's, and its run time."""
    hwm = status_kb("VmHWM") if reset else None
    self_kb = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    record = {
        "peak_rss_mb": round(self_kb / 1024.0, 1),
        "children_peak_rss_mb": round(children_kb / 1024.0, 1),
        "scope": "this node" if hwm is not None else "this worker process so far",
        "seconds": round(float(seconds), 2),
    }
    try:
        with open(os.path.join(cwd, PEAK_RSS_JSON), "w") as fh:
            json.dump(record, fh)
    except OSError:  # pragma: no cover - the record is diagnostic only
        pass


class ThreadedInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True, nohash=True,
                             desc="BLAS / torch threads (the node's n_procs)")


class ThreadedInterface(SimpleInterface):
    """Runs :meth:`_run` inside the node's thread budget; subclasses implement ``_run``."""

    def _run_interface(self, runtime):
        _worker_logging()
        reset = reset_peak_rss()
        start = time.perf_counter()
        with thread_budget(self.inputs.num_threads):
            out = self._run(runtime)
        _write_peak_rss(runtime.cwd, reset, time.perf_counter() - start)
        return out

    def _run(self, runtime):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def save_json(runtime, name: str, obj) -> str:
        path = os.path.join(runtime.cwd, name)
        with open(path, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
        return path

    @staticmethod
    def save_npz(runtime, name: str, arrays: dict) -> str:
        path = os.path.join(runtime.cwd, name)
        np.savez(path, **arrays)
        return path
