"""Node factories shared by the participant and group graphs: names, threads, memory."""

from __future__ import annotations

import re

import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe


def safe_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", str(text)).strip("_")


def make_node(interface, name, mem_gb, n_procs=1, crash_dir=None):
    if "num_threads" in interface.inputs.trait_names():
        interface.inputs.num_threads = n_procs
    node = pe.Node(interface, name=name, mem_gb=mem_gb, n_procs=n_procs)
    if crash_dir is not None:
        node.config = {"execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt"}}
    return node


def scan_n_voxels(bold, mask=None, default: int = 30000) -> int:
    """Voxels / vertices the scan's encoding fits: brain-mask voxels, else the BOLD's
    spatial size (NIfTI header; GIFTI vertex counts); ``default`` if unreadable."""
    import nibabel as nib

    try:
        if mask:
            return int(np.count_nonzero(np.asarray(nib.load(mask).dataobj)))
        files = [bold] if isinstance(bold, str) else list(bold)
        total = 0
        for f in files:
            img = nib.load(f)
            if hasattr(img, "darrays"):
                total += int(img.darrays[0].dims[0]) if img.darrays else 0
            else:
                total += int(np.prod(img.shape[:3]))
        return total or default
    except Exception:  # noqa: BLE001 - an estimate only; the nodes report real errors
        return default


def estimate_mem_gb(n_trs: int, n_ans: int, n_voxels: int = 30000) -> dict:
    """Rough per-node memory (GB) so MultiProc does not overcommit."""
    x = n_trs * n_ans * 4 / 1e9
    return {
        "extract": 1.5 + 3 * x,
        "dictionary": 0.5 + 4 * x,
        "encode": 0.5 + 12 * n_trs * n_voxels * 4 / 1e9,
        "label": 1.0 + 20 * n_trs * n_voxels * 4 / 1e9,
        "sink": 0.5,
    }


def gather(wf, sources, dest, dest_field, name):
    """Connect every ``(node, field)`` in ``sources`` into one flat list on ``dest``."""
    merge = pe.Node(niu.Merge(len(sources), ravel_inputs=True), name=name, mem_gb=0.1,
                    n_procs=1)
    for i, (src, field) in enumerate(sources, start=1):
        wf.connect(src, field, merge, f"in{i}")
    wf.connect(merge, "out", dest, dest_field)
