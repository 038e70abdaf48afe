"""Run the app in a fresh process, echo its output, and keep the labelling null lines.

Used by end_to_end.py and scale.py: the labels node logs the seconds of its temporal
null pass and of its spatial null (networks/labelling.py), which those benchmarks print
beside the per-node table so that the spatial null's cost is visible on its own.
"""

from __future__ import annotations

import re
import subprocess
import sys

NULL_LINE = re.compile(r"labels: (temporal null pass|spatial null) .*")


def run_teed(cmd, **kwargs) -> tuple[int, list[str]]:
    """Run ``cmd``; echo stdout+stderr as they come; return (exit code, the null lines)."""
    kept = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, **kwargs) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            m = NULL_LINE.search(line)
            if m:
                kept.append(m.group(0))
    return proc.returncode, kept


def print_null_costs(lines: list[str]) -> None:
    if not lines:
        print("labelling nulls: no timing lines (no atom passed p_time, or logging off)")
        return
    print("labelling nulls (seconds inside the labels node):")
    for line in lines:
        print(f"    {line}")
