"""Network labels that hold in the tail (issue 14): max-statistic FWER and specificity.

The data come from the small simulator below (numpy / scipy.ndimage only): smooth noise
on a 15 x 12 x 8 grid, six block networks, smooth atom time courses, a planted response
of atom 0 in chosen networks or in every voxel. The coefficient maps are fitted here with
plain numpy; the code under test is label_atoms with its temporal (ShiftNull) and
spatial (VariogramNull, brainsmash) nulls, and maxstat_pvalues.
"""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, uniform_filter1d

from bids_llm_encode.networks import (
    Atlas,
    ShiftNull,
    VariogramNull,
    label_atoms,
    maxstat_pvalues,
)

pytest.importorskip("brainsmash")

SHAPE = (15, 12, 8)
ALPHA = 10.0


def _grid():
    ijk = np.argwhere(np.ones(SHAPE, bool))
    return ijk * 3.0, 1 + (ijk[:, 0] // 5) * 2 + (ijk[:, 1] // 6)  # 6 networks, 240 voxels


COORDS, LABELS = _grid()
ATLAS = Atlas("blocks", LABELS, {i: f"N{i}" for i in range(1, 7)})


def _dataset(seed, planted=(), amp=0.6, global_amp=0.0, T=200, k=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T + 16, k))
    D = uniform_filter1d(x, 4, axis=0)[8: 8 + T]
    noise = gaussian_filter(rng.standard_normal((T,) + SHAPE), (0, 1.2, 1.2, 1.2))
    Y = uniform_filter1d(noise, 2, axis=0).reshape(T, -1)
    Y = Y / Y.std(0)
    for net in planted:
        Y[:, LABELS == net] += amp * D[:, [0]]
    Y = Y + global_amp * D[:, [0]]
    return Y, D


def _fit(Y, D):
    """Ridge on z-scored data, the encoding convention (written here, not imported)."""
    Yz = (Y - Y.mean(0)) / Y.std(0)
    Dz = (D - D.mean(0)) / D.std(0)
    return np.linalg.solve(Dz.T @ Dz + ALPHA * np.eye(D.shape[1]), Dz.T @ Yz)


def _label(Y, D, n_space=40, seed=0):
    null = ShiftNull(Y, D, np.full(Y.shape[1], ALPHA), n_null=100000)  # every shift
    spatial = VariogramNull(COORDS, n_null=n_space, seed=seed, knn=50, ns=200)
    return label_atoms(_fit(Y, D), np.ones(Y.shape[1]), [ATLAS], null,
                       spatial_null=spatial), null


def _labelled(table):
    sig = table[table["significant"]]
    return {(int(a), n, d) for a, n, d in zip(sig.atom, sig.network, sig.direction,
                                               strict=True)}


def test_uses_every_admissible_shift_and_reports_columns():
    Y, D = _dataset(3)
    table, null = _label(Y, D)
    T, m = Y.shape[0], null.min_shift
    assert null.exhaustive and null.n_null == T - 2 * m + 1
    assert (table["n_null"] == null.n_null).all()
    for col in ("dice", "p_time", "p_space", "q", "significant", "enrichment", "statistic"):
        assert col in table.columns
    assert (table["statistic"] == "dice").all()
    assert table["p_time"].min() >= 1.0 / (null.n_null + 1) - 1e-12


def test_one_network_planted_labels_that_network_only():
    Y, D = _dataset(1, planted=(3,))
    table, _ = _label(Y, D)
    assert _labelled(table) == {(0, "N3", "activated")}
    row = table[(table.atom == 0) & (table.network == "N3")
                & (table.direction == "activated")].iloc[0]
    assert row.enrichment > 3 and row.q < 0.05
    assert (table.loc[~table.significant, "q"] >= 0.05).all()


def test_two_adjacent_networks_planted_labels_both():
    Y, D = _dataset(2, planted=(3, 4))  # x slab 2, both y halves: side by side
    table, _ = _label(Y, D)
    assert _labelled(table) == {(0, "N3", "activated"), (0, "N4", "activated")}


def test_global_component_labels_no_network():
    """An atom in every voxel relates to every network in time, but to none specifically."""
    Y, D = _dataset(4, global_amp=0.8)
    table, _ = _label(Y, D)
    assert _labelled(table) == set()
    # global signal plus one planted network: the network only
    Y, D = _dataset(5, planted=(2,), global_amp=0.8, amp=1.2)
    table, _ = _label(Y, D)
    assert _labelled(table) <= {(0, "N2", "activated")}


def test_fwer_calibrated_on_pure_noise():
    """Far tail: the rate of datasets with ANY row p_time < .05 (a family of 3 atoms x 2
    directions x 6 networks = 36 rows) stays near 5 %; uncorrected p < .05 does not."""
    any_time, any_sig, any_raw = [], [], []
    for seed in range(24):
        Y, D = _dataset(100 + seed)
        table, _ = _label(Y, D, n_space=20, seed=seed)
        any_time.append(bool((table.p_time < 0.05).any()))
        any_sig.append(bool(table.significant.any()))
        any_raw.append(bool((table.p < 0.05).any()))
    # P(X >= 4 | n = 24, p = .05) = 3 %
    assert sum(any_time) <= 3 and sum(any_sig) <= 3
    assert sum(any_raw) > sum(any_time)  # the correction is doing something


def test_spatial_fwer_calibrated_on_random_smooth_maps():
    """p_space alone: smooth random maps unrelated to the atlas, temporal null that always
    passes (p_time at its floor): family-wise false labels stay near 5 %. The surrogates'
    kernel (knn nearest voxels) must reach as far as the map's autocorrelation: with maps
    smoothed at sigma = 1.5 voxels and knn = 50 this test failed (6 of 20)."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(20):
        m = gaussian_filter(rng.standard_normal(SHAPE), 1.0).ravel()
        m = 3.0 * m / m.std()
        null = np.zeros((60, 1, m.size))  # null maps never pass the cut
        spatial = VariogramNull(COORDS, n_null=20, seed=int(rng.integers(1000)), knn=50,
                                ns=200)
        table = label_atoms(m[None], np.ones(m.size), [ATLAS], null,
                            threshold_mode="absolute", spatial_null=spatial)
        assert (table.loc[table.n_overlap > 0, "p_time"] < 0.05).all()
        hits += bool(table.significant.any())
    assert hits <= 3  # P(X >= 4 | n = 20, p = .05) = 1.6 %


def test_maxstat_matches_direct_computation():
    rng = np.random.default_rng(0)
    null = rng.standard_normal((99, 5)) * np.array([1, 2, 3, 4, 5])
    obs = np.array([0.0, 5.0, 3.0, 20.0, -1.0])
    p, p_perm = maxstat_pvalues(obs, null)
    allv = np.vstack([obs, null])
    mu, sd = allv.mean(0), allv.std(0)
    sd = np.maximum(sd, 0.5 * np.median(sd))  # the documented floor
    zmax = ((null - mu) / sd).max(1)
    expect = [(1 + np.sum(zmax >= (o - a) / s)) / 100 for o, a, s in zip(obs, mu, sd,
                                                                          strict=True)]
    np.testing.assert_allclose(p, expect)
    assert np.all(p >= p_perm - 1e-12) and p.min() == pytest.approx(0.01)


def test_label_participant_volume_reports_draws_and_labels(tmp_path):
    """pipeline.label_participant on NIfTI BOLD: every admissible shift, the variogram
    spatial null, the planted network only, and the sidecar's account of the draws."""
    import nibabel as nib

    from bids_llm_encode.pipeline import label_participant

    Y, D = _dataset(11, planted=(3,), amp=0.8)
    T = Y.shape[0]
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.moveaxis(Y.reshape((T,) + SHAPE), 0, -1).astype(np.float32),
                             aff), tmp_path / "bold.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), aff), tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(LABELS.reshape(SHAPE).astype(np.int16), aff),
             tmp_path / "atlas.nii.gz")
    (tmp_path / "names.tsv").write_text("index\tname\n" + "".join(
        f"{i}\tN{i}\n" for i in range(1, 7)))
    np.save(tmp_path / "atoms.npy", D)
    np.savez(tmp_path / "maps.npz", coefs=_fit(Y, D), r2_atoms=np.full(Y.shape[1], 0.05),
             alphas=np.full(Y.shape[1], ALPHA))
    table, meta = label_participant(
        [str(tmp_path / "bold.nii.gz")], str(tmp_path / "mask.nii.gz"),
        str(tmp_path / "atoms.npy"), str(tmp_path / "maps.npz"), (0, T),
        atlases=[str(tmp_path / "atlas.nii.gz")], labels=[str(tmp_path / "names.tsv")],
        null="shift", n_null=1000, delays=None, threshold=1.96, seed=0)
    assert meta["NullDrawsUsed"] == meta["AdmissibleShifts"] == T - 2 * 20 + 1
    assert "variogram" in meta["SpatialNull"] and meta["SpatialNullDraws"] == 100
    assert _labelled(table) == {(1, "N3", "activated")}  # atoms count from 1


def _reference_null_pass(coefs, r2, members, null_maps, z=1.96, floor_fraction=0.5):
    """Plain reference of the labelling's null pass (explicit loops over draws):
    every voxel's null sd = sqrt(atom factor x voxel factor) of the mean squared null
    coefficients, observed and null maps cut at +/- z of it, overlap counts with each
    network (``members``: V x M booleans, hard or overlapping), Dice, then the
    single-step max-statistic p over all rows (rows standardised by their own null)."""
    valid = np.isfinite(r2) & np.isfinite(coefs).all(0)
    n, k, V = null_maps.shape
    M = members.shape[1]
    m2 = np.zeros((k, V))
    for i in range(n):
        m2 += np.nan_to_num(null_maps[i].astype(float)) ** 2
    m2 /= n
    atom = np.array([m2[j, valid].mean() for j in range(k)])
    sd = np.zeros((k, V))
    for v in np.flatnonzero(valid):
        voxel = np.mean([m2[j, v] / atom[j] for j in range(k)])
        sd[:, v] = np.sqrt(atom * voxel)

    def counts(x):
        inter = np.zeros((2, k, M))
        size = np.zeros((2, k))
        for j in range(k):
            ok = valid & (sd[j] > 0)
            zj = np.where(ok, x[j] / np.where(sd[j] > 0, sd[j], 1.0), 0.0)
            for d, mask in enumerate((ok & (zj >= z), ok & (zj <= -z))):
                size[d, j] = mask.sum()
                for m in range(M):
                    inter[d, j, m] = np.sum(mask & members[:, m])
        dice = np.zeros_like(inter)
        for d in range(2):
            for j in range(k):
                for m in range(M):
                    den = size[d, j] + members[:, m].sum()
                    dice[d, j, m] = 2 * inter[d, j, m] / den if den else 0.0
        return inter, size, dice

    obs = counts(coefs)
    null = [counts(null_maps[i].astype(float)) for i in range(n)]
    inter_null = np.stack([c[0] for c in null])
    size_null = np.stack([c[1] for c in null])
    dice_obs, dice_null = obs[2].ravel(), np.stack([c[2].ravel() for c in null])
    allv = np.vstack([dice_obs, dice_null])
    mean, sdr = allv.mean(0), allv.std(0)
    floor = floor_fraction * np.median(sdr[sdr > 1e-12])
    sdr = np.maximum(sdr, floor)
    zmax = [max((dice_null[i] - mean) / sdr) for i in range(n)]
    z_obs = (dice_obs - mean) / sdr
    p = np.array([(1 + sum(zm >= zo - 1e-10 for zm in zmax)) / (1 + n) for zo in z_obs])
    p = np.where(obs[0].ravel() > 0, p, 1.0)
    return dict(inter=obs[0], size=obs[1], dice=obs[2], p_time=p.reshape(obs[2].shape),
                inter_null=inter_null, size_null=size_null,
                dice_null=dice_null.reshape((n,) + obs[2].shape))


@pytest.mark.parametrize("overlapping", [False, True])
def test_fast_null_pass_equals_plain_reference(overlapping):
    """The null pass (one-pass streaming of a ShiftNull, and a cached array) equals the
    plain reference: counts and Dice of every observed and null map, and p_time."""
    from bids_llm_encode.networks.atlases import network_table
    from bids_llm_encode.networks.labelling import _label_atoms_nullz

    Y, D = _dataset(3, planted=(2,), amp=0.5)
    V = Y.shape[1]
    coefs = _fit(Y, D)
    r2 = np.ones(V)
    r2[:7] = np.nan  # voxels without data stay out of maps and scale
    if overlapping:  # soft atlas: two networks covering overlapping halves of the grid
        members = np.zeros((V, 3), bool)
        members[:150, 0] = True
        members[100:, 1] = True
        members[LABELS == 2, 2] = True
        atlas = Atlas("soft", np.where(members.any(1), members.argmax(1) + 1, 0),
                      {1: "A", 2: "B", 3: "C"}, membership=members)
    else:
        atlas, members = ATLAS, np.stack([LABELS == i for i in range(1, 7)], 1)
    null = ShiftNull(Y, D, np.full(V, ALPHA), n_null=60, seed=1, batch=50)
    maps = null.to_array()
    ref = _reference_null_pass(coefs, r2, members, maps)
    onehot, _ = network_table([atlas])
    sizes = onehot.sum(0).astype(float)
    for nul, cache in ((null, 0), (maps, 2**30)):  # one-pass streaming; cached array
        fast = _label_atoms_nullz(coefs, r2, onehot, sizes, nul, 1.96, cache)
        assert np.array_equal(fast["inter_obs"], ref["inter"])
        assert np.array_equal(fast["size_obs"], ref["size"])
        assert np.allclose(fast["null_d"], ref["dice_null"], rtol=0, atol=1e-6)
        table = label_atoms(coefs, r2, [atlas], nul, cache_bytes=cache)
        order = ["activated", "deactivated"]
        got = np.zeros_like(ref["p_time"])
        dice = np.zeros_like(ref["dice"])
        names = {n: i for i, n in enumerate(atlas.names[i] for i in sorted(atlas.names))}
        for row in table.itertuples():
            idx = (order.index(row.direction), row.atom, names[row.network])
            got[idx], dice[idx] = row.p_time, row.dice
        assert np.allclose(dice, ref["dice"], rtol=0, atol=1e-6)
        assert np.array_equal(got, ref["p_time"])
    # the test has power: planted atom 0 in N2 is labelled, and null maps do overlap
    assert ref["p_time"][0, 0].min() < 0.05 and ref["inter_null"].sum() > 0
