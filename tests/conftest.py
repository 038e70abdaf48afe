"""Shared fixtures. Tests that need ../shared (real Narratives metadata) skip with a clear
reason only when that folder is absent (a user's clone); CI always has it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NARRATIVES = SHARED / "narratives"

requires_shared = pytest.mark.skipif(
    not NARRATIVES.is_dir(), reason=f"real Narratives metadata not found at {NARRATIVES}"
)


def write_bold(path: Path, n_trs: int, shape=(4, 4, 4), seed=0, affine=None):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = (1000 + rng.standard_normal(shape + (n_trs,))).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4, 4, 1]) if affine is None else affine), path)
    return path


@pytest.fixture
def narratives_copy(tmp_path):
    """The real Narratives metadata copied to a temp folder (tests may add BOLD to it)."""
    if not NARRATIVES.is_dir():
        pytest.skip(f"real Narratives metadata not found at {NARRATIVES}")
    root = tmp_path / "narratives"
    shutil.copytree(NARRATIVES, root)
    return root


def add_clean_bold(root: Path, subject: str, task: str, run=None, n_trs=300, deriv="afni-nosmooth"):
    r = f"_run-{run}" if run else ""
    path = (root / "derivatives" / deriv / f"sub-{subject}" / "func" /
            f"sub-{subject}_task-{task}{r}_space-MNI152NLin2009cAsym_res-native_desc-clean_bold.nii.gz")
    return write_bold(path, n_trs)
