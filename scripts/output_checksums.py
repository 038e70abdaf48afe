"""Checksums of a derivatives folder's results: every TSV's bytes and every NIfTI/GIFTI's
data array (headers and JSON sidecars hold times and paths, so they are left out).

    python scripts/output_checksums.py demo/derivatives > before.txt
    diff before.txt after.txt      # identical results print nothing
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def checksums(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.name.endswith(".tsv"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        elif path.name.endswith((".nii.gz", ".nii", ".gii")):
            img = nib.load(path)
            arrays = ([d.data for d in img.darrays] if path.name.endswith(".gii")
                      else [np.asarray(img.dataobj)])
            h = hashlib.sha256()
            for a in arrays:
                h.update(np.ascontiguousarray(a).tobytes())
            out[rel] = h.hexdigest()[:16]
    return out


if __name__ == "__main__":
    for rel, digest in checksums(Path(sys.argv[1])).items():
        print(digest, rel)
