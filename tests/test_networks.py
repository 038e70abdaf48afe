"""networks package: atlases, Dice, thresholds, FDR, shift/spin nulls, calibration, recovery."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from bids_llm_encode.compute import zscore_columns
from bids_llm_encode.errors import AppError, InputDataError, MissingInputError
from bids_llm_encode.networks.atlases import Atlas, load_atlas
from bids_llm_encode.networks.labelling import label_atoms
from bids_llm_encode.networks.overlap import (
    count_pvalues,
    dice,
    fdr_bh,
    permutation_pvalues,
    threshold_map,
)
from bids_llm_encode.networks.spatial_nulls import (
    SpinNull,
    fibonacci_sphere,
    load_sphere_coords,
    spin_maps,
    spin_permutations,
)
from bids_llm_encode.networks.temporal_nulls import (
    BandedShiftNull,
    ShiftNull,
    ridge_coefs,
    shift_null_coefs,
)

SHARED = Path(__file__).parents[1].parent / "shared"
ATLASES = SHARED / "atlases"
requires_shared_atlases = pytest.mark.skipif(
    not (ATLASES / "TY7.nii.gz").is_file(),
    reason=f"Yeo test atlases not found at {ATLASES} (../shared absent: a user's clone)")


# ------------------------------------------------------------------ simulation helpers


def _zt(a):
    return zscore_columns(a, dtype=np.float64)[0]


def voronoi_networks(shape, n_networks, n_parcels, rng):
    """Distributed synthetic networks: Voronoi parcels dealt round-robin to networks."""
    seeds = rng.uniform(0, np.array(shape), (n_parcels, 3))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    d = ((grid.reshape(-1, 1, 3) - seeds[None]) ** 2).sum(-1)
    return (d.argmin(1) % n_networks) + 1


def heldout_r2(Y, D, alphas):
    """Held-out R2 of a ridge fitted on the first half, tested on the second half."""
    h = Y.shape[0] // 2
    Yz, Dz = _zt(Y), _zt(D)
    W = ridge_coefs(Yz[:h], Dz[:h], alphas, zscore=False)
    res = Yz[h:] - Dz[h:] @ W
    yc = Yz[h:] - Yz[h:].mean(0)
    return 1 - (res ** 2).sum(0) / (yc ** 2).sum(0)


def simulate(rng, shape, T, k, labels=None, plant=None, amp=0.0, noise_sigma=(2, 1.5, 1.5, 1.5),
             diffuse=0.0):
    """BOLD (T x V) = smooth noise (+ atom 0 planted with +amp / -amp in two networks, on top
    of a weak voxel-wise random effect of sd ``diffuse`` everywhere, so that most voxels have
    R2 > 0 and the planted networks are a minority of them, as in a real brain)."""
    V = int(np.prod(shape))
    D = gaussian_filter1d(rng.standard_normal((T, k)), 2, axis=0)
    Y = gaussian_filter(rng.standard_normal((T,) + shape), noise_sigma).reshape(T, V)
    Y /= Y.std()
    if plant is not None:
        pos, neg = plant
        w = np.zeros(V)  # effect sizes vary over the network's voxels (0.2-2 x amp)
        w[labels == pos] = amp * rng.uniform(0.2, 2.0, int(np.sum(labels == pos)))
        w[labels == neg] = -amp * rng.uniform(0.2, 2.0, int(np.sum(labels == neg)))
        w += diffuse * rng.standard_normal(V)
        Y = Y + np.outer(_zt(D)[:, 0], w)
    alphas = 10.0 ** rng.integers(0, 2, V)  # a grid, like the encoding stage
    return Y, D, alphas


# ------------------------------------------------------------------ package API


def test_package_reexports_the_public_names():
    """``from bids_llm_encode.networks import X`` keeps working for the pipeline, group,
    reports and simulation modules: every public name is the submodule's own object."""
    import bids_llm_encode.networks as pkg

    assert pkg.ShiftNull is ShiftNull and pkg.label_atoms is label_atoms
    assert all(hasattr(pkg, name) for name in pkg.__all__)
    for name in ("Atlas", "BandedShiftNull", "FSAVERAGE_MESHES", "ShiftNull", "SpinNull",
                 "label_atoms", "load_atlas", "load_sphere_coords", "ridge_coefs"):
        assert name in pkg.__all__, name


# ------------------------------------------------------------------ Dice, FDR, threshold


def test_dice_hand_cases():
    a = np.array([1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 1, 1], bool)
    assert dice(a, b) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 0.0  # defined: empty vs empty = 0
    assert dice(np.zeros(4, bool), np.array([1, 0, 0, 0], bool)) == 0.0
    assert dice(np.ones((2, 3), bool), np.eye(2, 3, dtype=bool)) == pytest.approx(4 / 8)
    with pytest.raises(ValueError):
        dice(np.ones(3, bool), np.ones(4, bool))


def test_fdr_bh_hand_cases_and_scipy():
    from scipy.stats import false_discovery_control

    p = np.array([0.01, 0.04, 0.03, 0.20])
    # sorted 0.01 0.03 0.04 0.20 -> 0.04, 0.06, 0.0533 -> monotone 0.04 0.0533 0.0533 0.20
    np.testing.assert_allclose(fdr_bh(p), [0.04, 0.16 / 3, 0.16 / 3, 0.20])
    np.testing.assert_allclose(fdr_bh([0.5]), [0.5])
    np.testing.assert_allclose(fdr_bh([0.9, 0.95]), [0.95, 0.95])
    q = fdr_bh([0.01, np.nan, 0.02])
    assert np.isnan(q[1]) and np.allclose(q[[0, 2]], [0.02, 0.02])
    rng = np.random.default_rng(0)
    pr = rng.uniform(0, 0.2, 200)
    np.testing.assert_allclose(fdr_bh(pr), false_discovery_control(pr, method="bh"))


def test_threshold_map_hand_case():
    coef = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 100.0, -100.0, 7.0])
    r2 = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, -0.1])  # last voxel: R2 <= 0
    out = threshold_map(coef, r2, z=1.5)
    valid = coef[:7]
    m, s = valid.mean(), valid.std()
    assert out.upper == pytest.approx(m + 1.5 * s) and out.lower == pytest.approx(m - 1.5 * s)
    assert out.activated.tolist() == [False] * 5 + [True, False, False]
    assert out.deactivated.tolist() == [False] * 6 + [True, False]
    # the 7.0 of the R2 <= 0 voxel never enters, even with a low threshold
    low = threshold_map(coef, r2, z=0.0)
    assert not low.activated[7] and not low.deactivated[7]
    # stacks: one threshold per row; constant / no valid voxel -> empty maps, NaN thresholds
    st = threshold_map(np.stack([coef, np.ones(8)]), r2, z=1.5)
    assert st.activated.shape == (2, 8) and np.isnan(st.upper[1]) and not st.activated[1].any()
    none = threshold_map(coef, -np.ones(8))
    assert np.isnan(none.upper) and not none.activated.any()
    # statistic maps (group t): cut at +/- z as they are
    ab = threshold_map(coef, r2, z=3.5, mode="absolute")
    assert ab.upper == 3.5 and ab.lower == -3.5
    assert ab.activated.tolist() == [False] * 4 + [True, True, False, False]
    assert ab.deactivated.tolist() == [False] * 6 + [True, False]
    with pytest.raises(ValueError):
        threshold_map(coef, r2, mode="robust")


def test_permutation_pvalues_empirical_and_tail():
    rng = np.random.default_rng(1)
    null = rng.standard_normal((200, 3))
    obs = np.array([0.0, 10.0, 2.5])
    p, p_perm = permutation_pvalues(obs, null, method="empirical")
    assert p_perm[1] == pytest.approx(1 / 201) and np.array_equal(p, p_perm)
    assert p_perm[0] == pytest.approx((1 + (null[:, 0] >= 0).sum()) / 201)
    p2, _ = permutation_pvalues(obs, null, method="auto")
    assert p2[0] == p_perm[0]  # many exceedances: empirical
    # far beyond the null: the tail fit may lower p, but never below 0 and never above
    # the permutation p; beyond a bounded fitted tail the permutation p is kept
    assert 0 < p2[1] <= p_perm[1]
    assert p2[2] <= p_perm[2]
    # a discrete tail with few distinct values is not extrapolated
    discrete = np.repeat(np.array([0.0, 0.01, 0.02]), [180, 15, 5])[:, None]
    p3, p3_perm = permutation_pvalues(np.array([0.03]), discrete, method="auto")
    assert p3[0] == p3_perm[0] == pytest.approx(1 / 201)


def test_count_pvalues_calibrated_and_resolving():
    rng = np.random.default_rng(0)
    # overdispersed null counts (negative binomial), observed drawn from the same law
    null = rng.negative_binomial(2, 0.4, size=(200, 4000))
    obs = rng.negative_binomial(2, 0.4, size=4000)
    p, _ = count_pvalues(obs, null)
    assert 0.02 <= (p < 0.05).mean() <= 0.08
    # an overlap far beyond every null draw gets a p far below 1/(n+1)
    p_far, p_perm = count_pvalues(np.array([60.0]), null[:, :1])
    assert p_far[0] < 1e-6 < p_perm[0]
    # zero overlap: p = 1; a null that never overlaps keeps the permutation p
    p0, _ = count_pvalues(np.array([0.0, 3.0]), np.zeros((200, 2)))
    assert p0[0] == 1.0 and p0[1] == pytest.approx(1 / 201)


# ------------------------------------------------------------------ atlases


def _img(data, vox=2.0, origin=(0.0, 0.0, 0.0)):
    aff = np.diag([vox, vox, vox, 1.0])
    aff[:3, 3] = origin
    return nib.Nifti1Image(np.asarray(data), aff)


def test_atlas_builder_hand_case(tmp_path):
    # 4x4x4 grid of 2 mm voxels; networks: x<2 -> 1, x>=2 -> 2, one empty plane (z=3)
    dseg = np.zeros((4, 4, 4), np.int16)
    dseg[:2, :, :3] = 1
    dseg[2:, :, :3] = 2
    nib.save(_img(dseg), tmp_path / "atl.nii.gz")
    (tmp_path / "atl.txt").write_text("Left\nRight\n")
    pd.DataFrame({"index": [1, 2], "name": ["L", "R"]}).to_csv(
        tmp_path / "atl.tsv", sep="\t", index=False)
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[:, :2, :] = 1  # y < 2 only
    ref, mimg = _img(np.zeros((4, 4, 4))), _img(mask)
    a = load_atlas(str(tmp_path / "atl.nii.gz"), ref, mimg, labels=tmp_path / "atl.txt")
    assert a.name == "atl" and a.names == {1: "Left", 2: "Right"}
    assert a.labels.shape == (int(mask.sum()),)
    np.testing.assert_array_equal(a.labels, dseg[mask.astype(bool)])
    assert a.counts() == {"Left": 12, "Right": 12}
    out = np.asarray(a.img.dataobj)
    assert out.shape == (4, 4, 4) and out[:, 2:].max() == 0 and out[0, 0, 0] == 1
    b = load_atlas(tmp_path / "atl.nii.gz", ref, mimg, labels=tmp_path / "atl.tsv")
    assert b.names == {1: "L", 2: "R"} and np.array_equal(a.labels, b.labels)
    # atlas on a 1 mm grid, resampled (nearest) to the 2 mm reference
    fine = np.repeat(np.repeat(np.repeat(dseg, 2, 0), 2, 1), 2, 2)
    nib.save(_img(fine, vox=1.0, origin=(-0.5, -0.5, -0.5)), tmp_path / "fine.nii.gz")
    c = load_atlas(str(tmp_path / "fine.nii.gz"), ref, mimg, labels=tmp_path / "atl.txt")
    np.testing.assert_array_equal(c.labels, a.labels)
    # TSV with a network column merges parcels into networks
    pd.DataFrame({"index": [1, 2], "name": ["p1", "p2"], "network": ["Net", "Net"]}).to_csv(
        tmp_path / "net.tsv", sep="\t", index=False)
    d = load_atlas(str(tmp_path / "atl.nii.gz"), ref, mimg, labels=tmp_path / "net.tsv")
    assert d.names == {1: "Net"} and set(np.unique(d.labels)) == {0, 1}


def test_atlas_bad_inputs(tmp_path):
    dseg = np.zeros((4, 4, 4), np.int16)
    dseg[:2] = 1
    dseg[2:] = 2
    nib.save(_img(dseg), tmp_path / "atl.nii.gz")
    ref = _img(np.ones((4, 4, 4)))
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(AppError, match=r"three\.txt.*3 names.*2 non-zero"):
        load_atlas(str(tmp_path / "atl.nii.gz"), ref, ref, labels=tmp_path / "three.txt")
    pd.DataFrame({"index": [1, 2, 3], "name": list("abc")}).to_csv(
        tmp_path / "three.tsv", sep="\t", index=False)
    with pytest.raises(AppError, match=r"three\.tsv"):
        load_atlas(str(tmp_path / "atl.nii.gz"), ref, ref, labels=tmp_path / "three.tsv")
    # GIFTI atlas for a volume analysis
    gii = nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(np.ones(10, np.int32))])
    nib.save(gii, tmp_path / "L.label.gii")
    nib.save(gii, tmp_path / "R.label.gii")
    with pytest.raises(AppError, match=r"GIFTI.*volumetric"):
        load_atlas(f"{tmp_path}/L.label.gii,{tmp_path}/R.label.gii", ref, ref)
    # volume atlas for a surface analysis
    with pytest.raises(AppError, match="surface"):
        load_atlas(str(tmp_path / "atl.nii.gz"), (10, 10), None)
    # no overlap with the mask after resampling (atlas far away)
    nib.save(_img(dseg, origin=(500.0, 0, 0)), tmp_path / "far.nii.gz")
    with pytest.raises(AppError, match=r"far\.nii\.gz.*no network inside the analysis mask"):
        load_atlas(str(tmp_path / "far.nii.gz"), ref, ref)
    # not a dseg / empty / missing
    nib.save(_img(dseg * 0.5), tmp_path / "float.nii.gz")
    with pytest.raises(AppError, match="non-integer"):
        load_atlas(str(tmp_path / "float.nii.gz"), ref, ref)
    nib.save(_img(dseg * 0), tmp_path / "empty.nii.gz")
    with pytest.raises(AppError, match="empty"):
        load_atlas(str(tmp_path / "empty.nii.gz"), ref, ref)
    with pytest.raises(MissingInputError, match="nope"):
        load_atlas(str(tmp_path / "nope.nii.gz"), ref, ref)
    with pytest.raises(AppError, match="schaefer2018-7 or schaefer2018-17"):
        load_atlas("schaefer2018-9", ref, ref)
    for err in (AppError,):
        assert issubclass(MissingInputError, err)


def test_surface_gifti_atlas(tmp_path):
    def label_gii(values, path):
        g = nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(np.asarray(values, np.int32),
                                                                   intent="NIFTI_INTENT_LABEL")])
        for key, name in [(0, "???"), (1, "Vis"), (2, "Default")]:
            lab = nib.gifti.GiftiLabel(key=key)
            lab.label = name
            g.labeltable.labels.append(lab)
        nib.save(g, path)

    label_gii([1, 1, 2, 0, 2], tmp_path / "L.label.gii")
    label_gii([2, 2, 0, 1], tmp_path / "R.label.gii")
    spec = f"{tmp_path}/L.label.gii,{tmp_path}/R.label.gii"
    mask = np.array([1, 1, 1, 1, 1, 1, 1, 0, 1], bool)
    a = load_atlas(spec, (5, 4), mask)
    assert a.space == "surface" and a.img is None
    assert a.names == {1: "Vis", 2: "Default"}
    np.testing.assert_array_equal(a.labels, [1, 1, 2, 0, 2, 2, 2, 1])
    with pytest.raises(AppError, match="vertices"):
        load_atlas(spec, (6, 4), None)


def test_seitzman_networks_and_counts():
    """nilearn's bundled Seitzman et al. (2020) ROIs: 300 ROIs, 13 networks + unassigned."""
    from nilearn.datasets import fetch_coords_seitzman_2018, load_mni152_brain_mask

    b = fetch_coords_seitzman_2018()
    counts = pd.Series(b.networks).value_counts().to_dict()
    # Counts read from nilearn 0.14.1's bundled seitzman_2018_ROIs_300inVol_MNI_allInfo.txt
    # (no per-network table was found in the paper to check them against). nilearn's
    # docstring: "assigned to one of 13 networks" -- the 14th label is "unassigned".
    expected = {"DefaultMode": 67, "SomatomotorDorsal": 53, "Visual": 37,
                "FrontoParietal": 36, "CinguloOpercular": 26, "unassigned": 15,
                "DorsalAttention": 14, "Auditory": 12, "Salience": 9, "VentralAttention": 9,
                "Reward": 8, "ParietoMedial": 5, "SomatomotorLateral": 5,
                "MedialTemporalLobe": 4}
    assert counts == expected
    assert sum(counts.values()) == 300 and len(counts) == 14
    # published radii: 5 mm cortical spheres, 4 mm subcortical/cerebellar
    regions, radius = np.asarray(b.regions), np.asarray(b.radius)
    assert set(radius[np.char.startswith(regions.astype(str), "cortex")]) == {5}
    assert set(radius[~np.char.startswith(regions.astype(str), "cortex")]) == {4}

    brain = load_mni152_brain_mask(resolution=2)
    a = load_atlas("seitzman2018", brain, brain)
    assert sorted(a.names.values()) == sorted(n for n in expected if n != "unassigned")
    assert len(a.names) == 13 and all(v > 0 for v in a.counts().values())
    assert a.meta["n_rois_in_mask"] == 285  # every assigned ROI lies in the brain mask
    # a 5 mm sphere on a 2 mm grid holds 81 voxel centres; overlaps shrink a few
    assert 30 < a.counts()["ParietoMedial"] / 5 <= 81
    both = load_atlas("seitzman2018", brain, brain, keep_unassigned=True)
    assert len(both.names) == 14 and "unassigned" in both.names.values()
    # coarse 4 mm grid: every ROI still gets at least the voxel holding its centre
    from nilearn.image import resample_img

    coarse = resample_img(brain, target_affine=np.diag([4.0, 4.0, 4.0]),
                          interpolation="nearest", force_resample=True, copy_header=True)
    c = load_atlas("seitzman2018", coarse, coarse)
    assert c.meta["n_rois_in_mask"] == 285 and len(c.counts()) == 13
    assert np.asarray(c.img.dataobj).shape == coarse.shape


@requires_shared_atlases
def test_yeo_atlases_from_shared(tmp_path):
    from nilearn.image import resample_img

    mask2 = nib.load(ATLASES / "cortex_mask_FSLMNI2mm.nii.gz")
    names7 = (ATLASES / "TY7.names.txt").read_text().split()
    a = load_atlas(str(ATLASES / "TY7.nii.gz"), mask2, mask2, labels=ATLASES / "TY7.names.txt")
    assert list(a.names.values()) == names7 == ["Visual", "Somatomotor", "DorsAttn",
                                                "Sal/VenAttn", "Limbic", "Control", "Default"]
    assert all(n > 5000 for n in a.counts().values())
    # resampled to a 4 mm grid (nearest neighbour)
    mask4 = resample_img(mask2, target_affine=np.diag([4.0, 4.0, 4.0]),
                         interpolation="nearest", force_resample=True, copy_header=True)
    a4 = load_atlas(str(ATLASES / "TY7.nii.gz"), mask4, mask4,
                    labels=ATLASES / "TY7.names.txt")
    assert a4.img.shape == mask4.shape and a4.labels.size == int(np.asarray(
        mask4.dataobj).astype(bool).sum())
    ratio = np.array(list(a4.counts().values())) / np.array(list(a.counts().values()))
    assert np.all((ratio > 0.08) & (ratio < 0.17))  # ~1/8 of the 2 mm voxels each
    a17 = load_atlas(str(ATLASES / "TY17.nii.gz"), mask4, mask4,
                     labels=ATLASES / "TY17.names.txt")
    assert len(a17.names) == 17 and a17.names[17] == "DefaultB"
    with pytest.raises(AppError, match="TY7.names.txt.*7 names.*17 non-zero"):
        load_atlas(str(ATLASES / "TY17.nii.gz"), mask4, mask4,
                   labels=ATLASES / "TY7.names.txt")


# ------------------------------------------------------------------ shift null


@pytest.mark.parametrize("alpha_kind", ["grid", "continuous"])
def test_shift_null_equals_naive_refit(alpha_kind):
    rng = np.random.default_rng(3)
    T, V, k = 120, 300, 5
    Y = rng.standard_normal((T, V)) * rng.uniform(0.5, 3, V) + 5
    D = rng.standard_normal((T, k))
    alphas = (10.0 ** rng.integers(0, 3, V) if alpha_kind == "grid"
              else 10.0 ** rng.uniform(0, 3, V))
    null = ShiftNull(Y, D, alphas, n_null=20, min_shift=12, seed=1, batch=64,
                     residualize=False)
    assert null.method == ("fft-alpha-groups" if alpha_kind == "grid" else "fft-eigenbasis")
    assert null.n_null == 20 and np.all((null.shifts >= 12) & (null.shifts <= T - 12))
    arr = null.to_array()
    assert arr.shape == (20, k, V) and arr.dtype == np.float32
    for i in (0, 7, 19):
        naive = ridge_coefs(np.roll(Y, null.shifts[i], axis=0), D, alphas)
        np.testing.assert_allclose(arr[i], naive, rtol=1e-4, atol=1e-5 * np.abs(naive).max())
    idx = np.array([5, 200, 17])
    np.testing.assert_allclose(null.compute(idx), arr[:, :, idx], rtol=1e-6)
    # option: ter Braak -- shift the residuals of the full model instead of Y
    res = ShiftNull(Y, D, alphas, n_null=20, min_shift=12, seed=1, residualize=True)
    Yz, Dz = _zt(Y), _zt(D)
    E = Yz - Dz @ ridge_coefs(Yz, Dz, alphas, zscore=False)
    naive = ridge_coefs(np.roll(E, res.shifts[4], axis=0), Dz, alphas, zscore=False)
    np.testing.assert_allclose(res.to_array()[4], naive, rtol=1e-4,
                               atol=1e-5 * np.abs(naive).max())
    # shift 0 is the observed fit
    np.testing.assert_allclose(ridge_coefs(Y, D, alphas),
                               ridge_coefs(_zt(Y), _zt(D), alphas, zscore=False))
    # exhaustive when n_null >= admissible shifts
    ex = shift_null_coefs(Y, D, alphas, n_null=1000, min_shift=12, as_array=False)
    assert ex.exhaustive and ex.n_null == T - 2 * 12 + 1
    assert isinstance(shift_null_coefs(Y[:, :10], D, alphas[:10], n_null=3), np.ndarray)
    with pytest.raises(InputDataError):
        ShiftNull(Y, D[:-1], alphas)
    with pytest.raises(InputDataError):
        ShiftNull(Y[:10], D[:10], alphas, min_shift=6)


def test_banded_shift_null_refits_the_encoding_model():
    """The null refits exactly the banded model fit_encoding fitted (atoms + nuisance band,
    each voxel's band penalties): at shift 0 the naive banded solve equals the encoding's
    coefficients, and every null map equals the naive solve on the shifted BOLD."""
    from bids_llm_encode.encoding import fit_encoding
    rng = np.random.default_rng(4)
    T, V, k = 160, 120, 4
    D = gaussian_filter1d(rng.standard_normal((T, k)), 2, axis=0)
    N = gaussian_filter1d(rng.standard_normal((T, 2)), 3, axis=0)
    Y = (D @ rng.standard_normal((k, V)) * rng.uniform(0, 1, V)
         + N @ rng.standard_normal((2, V)) + 2 * rng.standard_normal((T, V)))
    res = fit_encoding(Y, D, 1.5, nuisance=N, n_folds=4, gap_s=10.0)
    assert np.unique(np.round(res.alphas / res.band_alphas[0], 4)).size > 1  # several groups

    def banded_solve(Yv):
        X = np.hstack([_zt(D), _zt(N)])
        Yz = _zt(Yv)
        out = np.empty((k, V))
        for v in range(V):
            pen = np.r_[np.full(k, res.band_alphas[0, v]), np.full(2, res.band_alphas[1, v])]
            out[:, v] = np.linalg.solve(X.T @ X + np.diag(pen), X.T @ Yz[:, v])[:k]
        return out

    np.testing.assert_allclose(banded_solve(Y), res.coefs, rtol=1e-3, atol=1e-4)
    null = BandedShiftNull(Y, D, N, res.alphas, res.band_alphas, n_null=12, min_shift=16,
                           seed=2)
    arr = null.to_array()
    assert arr.shape == (12, k, V) and np.isfinite(arr).all()
    for i in (0, 5, 11):
        ref = banded_solve(np.roll(Y, null.shifts[i], axis=0))  # plain refit, shifted BOLD
        np.testing.assert_allclose(arr[i], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    idx = np.array([3, 77, 0])
    np.testing.assert_allclose(null.compute(idx), arr[:, :, idx], rtol=1e-6)
    # a plain ShiftNull with the overall alpha shrinks less: larger null coefficients
    plain = ShiftNull(Y, D, res.alphas, n_null=12, min_shift=16, seed=2).to_array()
    assert np.abs(plain).mean() > 1.2 * np.abs(arr).mean()


def test_label_atoms_streaming_equals_array():
    rng = np.random.default_rng(5)
    shape = (10, 10, 10)
    labels = voronoi_networks(shape, 4, 12, rng)
    atlas = Atlas("syn", labels, {1: "A", 2: "B", 3: "C", 4: "D"})
    Y, D, alphas = simulate(rng, shape, 100, 3, labels, plant=(1, 2), amp=0.3)
    coefs, r2 = ridge_coefs(Y, D, alphas), heldout_r2(Y, D, alphas)
    null = ShiftNull(Y, D, alphas, n_null=40, min_shift=10, seed=0, batch=97)
    for mode in ("nullz", "zscore"):
        t_arr = label_atoms(coefs, r2, [atlas], null.to_array(), threshold_mode=mode)
        t_obj = label_atoms(coefs, r2, [atlas], null, threshold_mode=mode)
        t_nocache = label_atoms(coefs, r2, [atlas], null, cache_bytes=0, threshold_mode=mode)
        for t in (t_obj, t_nocache):
            np.testing.assert_allclose(t["dice"], t_arr["dice"])
            np.testing.assert_allclose(t["p"], t_arr["p"])
            np.testing.assert_allclose(t["p_time"], t_arr["p_time"])
    assert list(t_arr.columns[:10]) == ["atom", "atlas", "network", "direction", "dice",
                                        "p_time", "p_space", "q", "significant", "n_voxels"]
    assert len(t_arr) == 3 * 2 * 4
    for t in (t_obj, t_nocache):
        np.testing.assert_allclose(t["dice"], t_arr["dice"])
        np.testing.assert_allclose(t["p"], t_arr["p"])
    # Dice column agrees with dice() on the thresholded maps
    thr = threshold_map(coefs, r2)
    row = t_arr[(t_arr.atom == 0) & (t_arr.network == "B") & (t_arr.direction == "deactivated")]
    assert row["dice"].item() == pytest.approx(dice(thr.deactivated[0], labels == 2))
    assert row["n_voxels"].item() == thr.deactivated[0].sum()
    assert row["threshold"].item() == pytest.approx(thr.lower[0])
    with pytest.raises(InputDataError):
        label_atoms(coefs, r2[:-1], [atlas], null)
    with pytest.raises(InputDataError):
        label_atoms(coefs, r2, [atlas], np.zeros((5, 2, r2.size)))


def test_null_calibration_pure_noise():
    """Pure noise, smooth in space and time: ~5 % of participant-level tests at p < 0.05.

    (In 4 x 8 simulated participants the rate at 0.05 was 0.031-0.064; at 0.01 ~0.02.)"""
    rng = np.random.default_rng(0)
    shape, T, k, M = (16, 16, 16), 200, 6, 6
    labels = voronoi_networks(shape, M, 24, rng)
    atlas = Atlas("syn", labels, {i + 1: f"N{i + 1}" for i in range(M)})
    ps = []
    for _ in range(8):
        Y, D, alphas = simulate(rng, shape, T, k)
        null = ShiftNull(Y, D, alphas, n_null=1000)  # T=200: 161 shifts >= 20 TRs from 0
        table = label_atoms(ridge_coefs(Y, D, alphas), heldout_r2(Y, D, alphas), [atlas],
                            null)
        ps.append(table["p"].to_numpy())
    ps = np.concatenate(ps)
    assert ps.size == 8 * k * 2 * M
    rate = float(np.mean(ps < 0.05))
    assert 0.02 <= rate <= 0.08, rate
    assert 0.1 <= float(np.mean(ps < 0.2)) <= 0.3


def test_planted_recovery():
    """Atom 0 planted positively in N3 and negatively in N7: exactly those two rows.

    R2 is set to 0.1 everywhere so that every voxel enters the z-scoring: the rule
    standardises each map over the R2 > 0 voxels, so a strong effect that fills a large
    share of them cannot reach |z| >= 1.96 (with 4096 synthetic voxels and a strong effect,
    the two planted networks would be ~45 % of the held-out R2 > 0 voxels)."""
    rng = np.random.default_rng(0)
    shape, T, k, M = (16, 16, 16), 400, 3, 12
    labels = voronoi_networks(shape, M, 3 * M, rng)
    atlas = Atlas("syn", labels, {i + 1: f"N{i + 1}" for i in range(M)})
    Y, D, alphas = simulate(rng, shape, T, k, labels, plant=(3, 7), amp=0.5)
    coefs, r2 = ridge_coefs(Y, D, alphas), np.full(Y.shape[1], 0.1)
    table = label_atoms(coefs, r2, [atlas], ShiftNull(Y, D, alphas, n_null=1000))
    sig = table[table.q < 0.05]
    got = set(zip(sig.atom, sig.network, sig.direction))
    assert got == {(0, "N3", "activated"), (0, "N7", "deactivated")}, sig
    assert (sig["dice"] > 0.4).all() and (sig["q"] < 0.02).all()
    # the opposite directions are not labelled
    opp = table[(table.atom == 0) & (((table.network == "N3") & (table.direction ==
                                                                 "deactivated"))
                                     | ((table.network == "N7") & (table.direction ==
                                                                   "activated")))]
    assert (opp.q >= 0.05).all() and (opp.dice == 0).all()


def test_residualised_null_keeps_planted_signal_out_of_other_atoms():
    """ter Braak residuals: the planted atom-0 pattern must not appear in the null maps."""
    rng = np.random.default_rng(1)
    shape, T = (10, 10, 10), 200
    labels = voronoi_networks(shape, 8, 16, rng)
    Y, D, alphas = simulate(rng, shape, T, 2, labels, plant=(1, 2), amp=2.0)
    pattern = (labels == 1).astype(float) - (labels == 2)
    share = {}
    for residualize in (False, True):
        null = ShiftNull(Y, D, alphas, n_null=50, residualize=residualize).to_array()
        # how much atom 1's null maps look like the planted (atom 0) pattern
        share[residualize] = float(np.mean([abs(np.corrcoef(m, pattern)[0, 1])
                                            for m in null[:, 1]]))
    assert share[False] > 0.15 and share[True] < share[False] / 2, share


# ------------------------------------------------------------------ spin null


def test_spin_permutations_on_a_sphere():
    lh = fibonacci_sphere(800)
    rh = lh * np.array([-1.0, 1.0, 1.0])  # mirror image of the left sphere
    perms = spin_permutations(lh, rh, n=50, seed=0)
    assert perms.shape == (50, 1600) and perms.dtype == np.int64
    assert perms[:, :800].max() < 800 and perms[:, 800:].min() >= 800
    # mirrored rotation: the right hemisphere spins as the mirror image of the left
    np.testing.assert_array_equal(perms[:, 800:] - 800, perms[:, :800])
    # nearest-neighbour reassignment is close to a permutation
    assert np.mean([np.unique(p).size for p in perms]) / 1600 > 0.6
    # a smooth map keeps its smoothness (same autocorrelation) but loses its position
    vals = np.concatenate([lh[:, 2], rh[:, 2]])
    spun = spin_maps(vals, perms)
    assert spun.shape == (50, 1600)
    assert abs(np.mean([np.corrcoef(vals, s)[0, 1] for s in spun])) < 0.25
    assert np.allclose(np.sort(spun[0]), np.sort(vals[perms[0]]))
    same = spin_permutations(lh, rh, n=50, seed=0)
    assert np.array_equal(same, perms)
    stack = spin_maps(np.stack([vals, -vals]), perms)
    assert stack.shape == (50, 2, 1600)


def test_spin_null_labels_a_planted_cap():
    rng = np.random.default_rng(2)
    lh = fibonacci_sphere(600)
    rh = lh * np.array([-1.0, 1.0, 1.0])
    xyz = np.concatenate([lh, rh])
    labels = np.where(xyz[:, 2] > 80, 1, np.where(xyz[:, 0] > 40, 2, 3))
    atlas = Atlas("caps", labels, {1: "Top", 2: "Side", 3: "Rest"}, space="surface")
    coefs = np.stack([np.exp(-((xyz[:, 2] - 100) / 15) ** 2)
                      + 0.1 * rng.standard_normal(1200), rng.standard_normal(1200)])
    r2 = np.full(1200, 0.1)
    null = SpinNull(spin_permutations(lh, rh, n=500, seed=1))
    table = label_atoms(coefs, r2, [atlas], null)
    top = table[(table.atom == 0) & (table.network == "Top") & (table.direction == "activated")]
    assert top.q.item() < 0.05
    assert (table[table.atom == 1].q >= 0.05).all()
    with pytest.raises(InputDataError):
        label_atoms(coefs[:, :1000], r2[:1000], [Atlas("c", labels[:1000], {1: "Top"})], null)


def test_fsaverage5_sphere_is_bundled():
    lh, rh = load_sphere_coords("fsaverage5")
    assert lh.shape == (10242, 3) and rh.shape == (10242, 3)
    np.testing.assert_allclose(np.linalg.norm(lh, axis=1), 100, rtol=1e-3)


def _sphere_field(xyz, rng, n_terms=30, width=25.0):
    """A smooth random field on a sphere: a sum of Gaussian bumps at random vertices."""
    centres = xyz[rng.choice(len(xyz), n_terms, replace=False)]
    d2 = ((xyz[:, None, :] - centres[None]) ** 2).sum(-1)
    return (np.exp(-d2 / (2 * width**2)) * rng.standard_normal(n_terms)).sum(1)


@pytest.fixture(scope="module")
def fsaverage5_sphere():
    lh, rh = load_sphere_coords("fsaverage5")
    xyz = np.concatenate([lh, rh])
    # a medial-wall-like strip without data on each hemisphere (|x| small, y mid)
    medial = (np.abs(xyz[:, 0]) < 25) & (np.abs(xyz[:, 1]) < 50)
    rng = np.random.default_rng(7)
    centres = rng.choice(len(xyz), 40, replace=False)
    d2 = ((xyz[:, None, :] - xyz[centres][None]) ** 2).sum(-1)
    labels = d2.argmin(1) % 8 + 1  # 40 patches, 8 networks of 5 patches
    return {"lh": lh, "rh": rh, "xyz": xyz, "keep": ~medial, "labels": labels}


def test_spin_null_for_vertices_spins_onto_vertices_with_data(fsaverage5_sphere):
    s = fsaverage5_sphere
    keep = s["keep"]
    n_lh = len(s["lh"])
    null = SpinNull.for_vertices(s["lh"], s["rh"], keep, n_null=20, seed=0)
    n_keep_lh = int(keep[:n_lh].sum())
    assert null.perms.shape == (20, keep.sum())
    assert null.perms.min() >= 0 and null.perms.max() < keep.sum()
    assert null.perms[:, :n_keep_lh].max() < n_keep_lh <= null.perms[:, n_keep_lh:].min()
    # the same rotations as on whole spheres wherever the rotated vertex lands on data
    full = spin_permutations(s["lh"], s["rh"], n=20, seed=0)[:, keep]
    position = np.full(keep.size, -1)
    position[keep] = np.arange(keep.sum())
    landed = keep[full]
    assert landed.mean() > 0.8
    np.testing.assert_array_equal(position[full][landed], null.perms[landed])
    coefs = np.arange(keep.sum(), dtype=float)[None]
    (sl, spun, r2), *rest = list(SpinNull(null.perms, batch=int(keep.sum())).blocks(
        coefs, np.ones(keep.sum())))
    assert not rest and spun.shape == (20, 1, keep.sum()) and np.isfinite(spun).all()
    np.testing.assert_array_equal(spun[:, 0], coefs[0][null.perms])
    with pytest.raises(InputDataError, match="vertices"):
        SpinNull.for_vertices(s["lh"], s["rh"], keep[:-1])


def _hemisphere_fields(s, rng):
    """Independent smooth fields on each hemisphere (the spin null's assumption)."""
    return np.concatenate([_sphere_field(s["lh"], rng, 15), _sphere_field(s["rh"], rng, 15)])


def test_spin_null_on_fsaverage5_planted_and_calibrated(fsaverage5_sphere):
    """Real fsaverage5 sphere with a medial wall: a map planted + in N2 and - in N5 gets
    exactly those labels; smooth random maps give ~5 % of p < 0.05."""
    s = fsaverage5_sphere
    keep, labels = s["keep"], s["labels"][s["keep"]]
    atlas = Atlas("patches", labels, {i: f"N{i}" for i in range(1, 9)}, space="surface")
    rng = np.random.default_rng(3)
    noise = np.stack([_hemisphere_fields(s, rng)[keep] for _ in range(33)])
    planted = 0.3 * noise[0] / noise[0].std() + 1.0 * (labels == 2) - 1.0 * (labels == 5)
    coefs = np.vstack([planted, noise[1:]])
    r2 = np.full(keep.sum(), 0.05)
    null = SpinNull.for_vertices(s["lh"], s["rh"], keep, n_null=300, seed=1)
    table = label_atoms(coefs, r2, [atlas], null)
    sig = table[table.q < 0.05]
    assert set(zip(sig.atom, sig.network, sig.direction)) == {
        (0, "N2", "activated"), (0, "N5", "deactivated")}, sig
    rate = float(np.mean(table.loc[table.atom > 0, "p"] < 0.05))  # 32 maps x 16 rows
    assert 0.02 <= rate <= 0.08, rate


def _gifti_sphere(path, xyz):
    arr = nib.gifti.GiftiDataArray(np.asarray(xyz, np.float32), intent="NIFTI_INTENT_POINTSET")
    nib.save(nib.gifti.GiftiImage(darrays=[arr]), path)


def test_fsaverage6_sphere_from_local_templateflow(tmp_path, monkeypatch):
    tpl = tmp_path / "tpl-fsaverage"
    tpl.mkdir()
    xyz = fibonacci_sphere(40962)
    for hemi, sign in (("L", 1.0), ("R", -1.0)):
        _gifti_sphere(tpl / f"tpl-fsaverage_hemi-{hemi}_den-41k_sphere.surf.gii",
                      xyz * [sign, 1, 1])
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    lh, rh = load_sphere_coords("fsaverage6")
    assert lh.shape == rh.shape == (40962, 3)
    np.testing.assert_allclose(lh, xyz, atol=1e-3)


def test_fsaverage6_sphere_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens: offline at once
    monkeypatch.setenv("NO_PROXY", "")
    with pytest.raises(AppError, match=r"fsaverage6 sphere.*den-41k.*--null shift"):
        load_sphere_coords("fsaverage6", data_dir=str(tmp_path / "nilearn"))


def test_participant_labelling_with_spin_null_on_surface_gifti(fsaverage5_sphere, tmp_path):
    """pipeline.label_participant on fsaverage5 GIFTI BOLD (NaN medial wall) with a GIFTI
    dseg atlas and --null spin: the planted atom/network pairs, and nothing else."""
    from bids_llm_encode.pipeline import label_participant

    s = fsaverage5_sphere
    n_lh = len(s["lh"])
    rng = np.random.default_rng(5)
    T, k = 160, 3
    D = gaussian_filter1d(rng.standard_normal((T, k)), 2, axis=0)
    D /= D.std(0)
    sign = (s["labels"] == 2).astype(float) - (s["labels"] == 5)
    Y = np.outer(D[:, 0], sign) + 1.5 * rng.standard_normal((T, sign.size))
    Y[:, ~s["keep"]] = np.nan
    bold = []
    for hemi, cols in (("L", slice(0, n_lh)), ("R", slice(n_lh, None))):
        darrays = [nib.gifti.GiftiDataArray(row.astype(np.float32)) for row in Y[:, cols]]
        bold.append(str(tmp_path / f"bold_hemi-{hemi}.func.gii"))
        nib.save(nib.gifti.GiftiImage(darrays=darrays), bold[-1])
        lab = nib.gifti.GiftiDataArray(s["labels"][cols].astype(np.int32),
                                       intent="NIFTI_INTENT_LABEL")
        nib.save(nib.gifti.GiftiImage(darrays=[lab]), tmp_path / f"atlas_hemi-{hemi}.label.gii")
    names = tmp_path / "names.tsv"
    names.write_text("index\tname\n" + "".join(f"{i}\tN{i}\n" for i in range(1, 9)))
    Yk = Y[:, s["keep"]]
    alphas = np.full(Yk.shape[1], 10.0)
    np.save(tmp_path / "atoms.npy", D)
    np.savez(tmp_path / "maps.npz", coefs=ridge_coefs(Yk, D, alphas),
             r2_atoms=np.full(Yk.shape[1], 0.05), alphas=alphas)
    atlas = f"{tmp_path}/atlas_hemi-L.label.gii,{tmp_path}/atlas_hemi-R.label.gii"
    table, meta = label_participant(bold, None, str(tmp_path / "atoms.npy"),
                                    str(tmp_path / "maps.npz"), (0, T), atlases=[atlas],
                                    labels=[str(names)], null="spin", n_null=200,
                                    delays=None, threshold=1.96, seed=0)
    assert meta["null"] == "spin"
    sig = table[table.q < 0.05]
    assert set(zip(sig.atom, sig.network, sig.direction)) == {
        (1, "N2", "activated"), (1, "N5", "deactivated")}, sig  # atoms count from 1
