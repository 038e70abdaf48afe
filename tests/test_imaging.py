"""Reading BOLD series: the block-wise masked read equals reading the whole image."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from bids_llm_encode.imaging import _masked_series, load_bold


def test_blockwise_masked_read_equals_whole_image(tmp_path):
    """Scaled int16 .nii.gz (nibabel applies the slope), blocks that do not divide T, a
    mask with holes: the (T x V) float32 series is exactly the whole-image read."""
    rng = np.random.default_rng(0)
    shape = (7, 6, 5, 23)
    raw = rng.integers(-3000, 3000, size=shape).astype(np.int16)
    img = nib.Nifti1Image(raw, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_slope_inter(0.37, 12.5)
    path = tmp_path / "bold.nii.gz"
    nib.save(img, path)
    mask = rng.random(shape[:3]) > 0.4
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), tmp_path / "mask.nii.gz")
    whole = np.asarray(nib.load(path).dataobj, dtype=np.float32)[mask].T
    per_volume = int(np.prod(shape[:3])) * 8
    for chunk in (per_volume, 4 * per_volume, 10**9):  # 1, 4 (23 = 5 x 4 + 3), all volumes
        got = _masked_series(str(path), mask, chunk_bytes=chunk)
        assert got.dtype == np.float32 and got.shape == (23, int(mask.sum()))
        np.testing.assert_array_equal(got, whole)
    Y, geom = load_bold([str(path)], str(tmp_path / "mask.nii.gz"))
    np.testing.assert_array_equal(Y, whole)
    assert Y.flags.c_contiguous
