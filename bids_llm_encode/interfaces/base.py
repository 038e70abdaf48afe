"""What every interface shares: a thread budget equal to the node's ``n_procs``.

MultiProc runs several nodes at once in forked workers where numpy/torch are already
imported, so OMP_NUM_THREADS cannot be set any more; without a limit two nodes on two
cores would each start two BLAS threads and slow each other down several times.
"""

from contextlib import contextmanager

from nipype.interfaces.base import BaseInterfaceInputSpec, traits


class ThreadedInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True, nohash=True,
                             desc="BLAS / torch threads (the node's n_procs)")


@contextmanager
def thread_budget(n: int):
    from threadpoolctl import threadpool_limits

    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    import scipy.fft

    before = torch.get_num_threads() if torch is not None else None
    # scipy.fft is single-threaded unless told (the shift null's FFTs)
    with threadpool_limits(limits=max(1, int(n))), scipy.fft.set_workers(max(1, int(n))):
        if torch is not None:
            torch.set_num_threads(max(1, int(n)))
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(before)
