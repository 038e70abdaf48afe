"""Node factories shared by the participant and group graphs: names, threads, memory."""

from __future__ import annotations

import re

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
