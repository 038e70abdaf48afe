"""What every heavy interface shares: a thread budget equal to the node's ``n_procs``, and
writing its results into the node's folder.

MultiProc runs several nodes at once in workers where numpy/torch are already imported,
so OMP_NUM_THREADS cannot be set any more; without a limit two nodes on two cores would
each start two BLAS threads and slow each other down several times.
"""

from __future__ import annotations

import json
import os

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, traits

from ..compute import thread_budget


class ThreadedInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True, nohash=True,
                             desc="BLAS / torch threads (the node's n_procs)")


class ThreadedInterface(SimpleInterface):
    """Runs :meth:`_run` inside the node's thread budget; subclasses implement ``_run``."""

    def _run_interface(self, runtime):
        with thread_budget(self.inputs.num_threads):
            return self._run(runtime)

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
