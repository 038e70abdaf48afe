"""Workers die with the main process (Linux): imported by MultiProc's forkserver
(``workflow.FORKSERVER_PRELOAD``), it asks the kernel to SIGKILL the forkserver when its
parent (the bids_llm_encode process) dies, and every worker forked from it when the
forkserver dies. Without it a ``kill -9`` of the main process left the forkserver and its
workers computing into the work folder for minutes. Elsewhere it does nothing."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """This process gets ``sig`` when its parent dies; False where prctl is missing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return True


def _install() -> None:
    # Only inside the forkserver (its parent is the main process); importing this module
    # anywhere else does nothing.
    if not _is_forkserver_main():
        return
    parent = os.getppid()
    if set_parent_death_signal():
        os.register_at_fork(after_in_child=set_parent_death_signal)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def _is_forkserver_main() -> bool:
    """Whether this import runs inside multiprocessing.forkserver.main (its preload)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "main" and \
                frame.f_code.co_filename.endswith(("forkserver.py", "forkserver.pyc")):
            return True
        frame = frame.f_back
    return False


_install()
