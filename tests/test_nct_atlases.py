"""Atlases of the Network Correspondence Toolbox (NCT) and the bundled default, kong2019.

The toolbox cache used here is ../shared/nct (see its README); the cross-check runs the
toolbox's own ``read_atlas`` and ``dice_coeff`` from the installed package's source. The
package pins numpy 1.26 and ~30 other exact versions, so it cannot sit in this project's
test extras; install it without its dependencies:
``pip install --no-deps cbig-network-correspondence==0.4.1``.
"""

from __future__ import annotations

import ast
import json
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.networks import NCT_ATLASES, dice, load_atlas
from bids_llm_encode.networks.nct import NCT_ENV, bundled_atlas_files, read_nct_atlas

NCT = Path(__file__).resolve().parents[2] / "shared" / "nct"
needs_nct = pytest.mark.skipif(not (NCT / "core").is_dir(),
                               reason=f"no NCT cache at {NCT} (../shared/nct is absent)")


@pytest.fixture
def nct_env(monkeypatch):
    monkeypatch.setenv(NCT_ENV, str(NCT))


@pytest.fixture(scope="module")
def grid8():
    from nilearn.datasets import load_mni152_brain_mask

    m = load_mni152_brain_mask(resolution=8)
    return nib.Nifti1Image((m.get_fdata() > 0).astype(np.uint8), m.affine)


def _cached_atlases():
    return sorted(p.name for p in (NCT / "core" / "atlas_config").iterdir()) \
        if (NCT / "core").is_dir() else []


@needs_nct
def test_hard_atlas_with_network_assignment(nct_env, grid8):
    a = load_atlas("nct:AS400K17", grid8, grid8)
    names = list((NCT / "core" / "network_names" / "AS400K17").read_text().split())
    assert [a.names[i] for i in sorted(a.names)] == names  # labels 1..17 in file order
    assert {"Language", "Auditory", "DefaultA", "DefaultB", "DefaultC"} <= set(a.names.values())
    counts = a.counts()
    assert all(counts[n] > 0 for n in names)  # every network lands on the 8 mm grid
    assert a.membership is None and set(np.unique(a.labels)) <= set(range(18))
    # parcels were merged into 17 networks: parcel 1 (LH DefaultA per the assignment) is 1
    src = read_nct_atlas("AS400K17", "FSLMNI2mm", root=NCT)
    raw = np.asarray(nib.load(NCT / "core/atlases/FSLMNI2mm/YeoLab/AS400K17.nii.gz").dataobj)
    assert src["labels"].max() == 17 and raw.max() == 400
    from scipy.io import loadmat

    mapping = loadmat(NCT / "core/network_assignment/AS400K17.mat")["mapping"].ravel()
    for parcel in (1, 57, 200, 333):
        inside = (raw == parcel) & (src["labels"] > 0)
        assert inside.any() and np.all(src["labels"][inside] == mapping[parcel - 1])


@needs_nct
def test_metric_atlas_networks_overlap(nct_env, grid8):
    a = load_atlas("nct:TW_TASK_NETS", grid8, grid8)
    assert a.membership is not None and a.membership.shape == (a.labels.size, 12)
    assert "Language(LN)" in a.names.values()
    per_voxel = a.membership.sum(1)
    assert per_voxel.max() >= 2  # overlapping masks: what one label per voxel cannot hold
    masks = a.masks()
    assert len(masks) == 12
    ln = [i for i, n in a.names.items() if n == "Language(LN)"][0]
    # the membership is the toolbox file itself, resampled: compare one network directly
    from nilearn.image import resample_to_img

    f = NCT / "core/atlases/FSLMNI2mm/Woodward/TW_TASK_NETS_LN.nii.gz"
    img = nib.load(f)
    data = np.asarray(img.dataobj)[..., 0]
    cortex = np.asarray(nib.load(NCT / "core/cortical_masks/FSLMNI2mm.nii.gz").dataobj) > 0
    # the mask is LAS (x = 90 - 2i), TW's files RAS (x = 2i - 90): same points, i mirrored
    cortex = cortex[::-1]
    ref = resample_to_img(nib.Nifti1Image(((data > 0) & cortex).astype(np.int16), img.affine),
                          grid8, interpolation="nearest", force_resample=True,
                          copy_header=True)
    expect = np.asarray(ref.dataobj)[np.asarray(grid8.dataobj) > 0] > 0
    np.testing.assert_array_equal(masks[ln], expect)


@needs_nct
@pytest.mark.parametrize("name", _cached_atlases())
def test_every_cached_atlas_loads_on_volume_and_fsaverage6(nct_env, grid8, name):
    names = [ln for ln in (NCT / "core" / "network_names" / name).read_text().splitlines()
             if ln.strip()]
    vol = load_atlas(f"nct:{name}", grid8, grid8)
    surf = load_atlas(f"nct:{name}", (40962, 40962))
    for a in (vol, surf):
        assert sorted(a.names.values()) == sorted(names)
        assert len(a.masks()) >= 0.5 * len(names)
    assert surf.labels.size == 2 * 40962 and surf.space == "surface"


def _toolbox_source():
    """The toolbox's compute_overlap_with_atlases.py and grab_data_info.py, from the
    installed package, without importing the package (its __init__ imports brainspace,
    vtk, seaborn... which are not installed here)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("cbig-network-correspondence")
    except PackageNotFoundError:
        pytest.skip("cbig-network-correspondence is not installed: "
                    "pip install --no-deps cbig-network-correspondence==0.4.1")
    assert dist.version == "0.4.1"
    base = Path(str(dist.locate_file("cbig_network_correspondence")))
    return base / "compute_overlap_with_atlases.py", base / "grab_data_info.py"


def _toolbox_functions():
    """The toolbox's own read_atlas, read_file, sort_files and dice_coeff, executed from its
    source. Only its file access is replaced: ``datasets`` (pooch, which downloads) becomes
    a lookup in the same cache, and natsort its documented natural order."""
    import copy
    import importlib.util
    import re
    from os import path

    from scipy.io import loadmat

    overlap_py, info_py = _toolbox_source()
    spec = importlib.util.spec_from_file_location("nct_grab_data_info", info_py)
    grab_info = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grab_info)

    class _Datasets:  # the cache, as datasets.fetch_file / fetch_dir resolve it offline
        @staticmethod
        def fetch_file(rel):
            p = NCT / "core" / rel
            assert p.is_file(), p
            return str(p)

    def natsorted(items):
        return sorted(items, key=lambda s: [int(t) if t.isdigit() else t.lower()
                                            for t in re.split(r"(\d+)", s)])

    tree = ast.parse(overlap_py.read_text())
    keep = {"read_atlas", "read_file", "sort_files", "dice_coeff"}
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in keep]
    assert {f.name for f in funcs} == keep
    ns = {"np": np, "nib": nib, "copy": copy, "path": path, "listdir": __import__("os").listdir,
          "loadmat": loadmat, "natsorted": natsorted, "datasets": _Datasets,
          "grab_info": grab_info}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(overlap_py), "exec"), ns)
    return ns, grab_info


class _Params:
    def __init__(self, name, grab_info, space="FSLMNI2mm"):
        self.config = grab_info.read_config(str(NCT / "core" / "atlas_config" / name))
        # as the toolbox's AtlasParams(name, space) + compute_overlap do for data in `space`
        self.config.space = space
        self.data_path = str(NCT / "core" / "atlases" / space / self.config.category)


@needs_nct
@pytest.mark.parametrize("name", ["AS400K17", "AL20", "WS90_14"])
def test_dice_equals_the_toolbox_dice(nct_env, name):
    """A binarised map on the toolbox's own grid (FSL MNI 2 mm): our atlas + our Dice equal
    the toolbox's read_atlas + dice_coeff, network by network: a hard parcellation with a
    parcel -> network assignment, a soft one (thresholded), a hard one without assignment
    whose labels skip a value. (Not TW_TASK_NETS: see the next test.)"""
    from scipy.ndimage import gaussian_filter

    ns, grab_info = _toolbox_functions()
    params = _Params(name, grab_info)
    tb = ns["read_atlas"](params)  # hard: label volume; metric: list of volumes

    cortex_img = nib.load(NCT / "core/cortical_masks/FSLMNI2mm.nii.gz")
    rng = np.random.default_rng(3)
    field = gaussian_filter(rng.standard_normal(cortex_img.shape), 3.0)
    bin_map = field > np.quantile(field, 0.8)  # a binarised map, 20 % of the box

    ours = load_atlas(f"nct:{name}", cortex_img, None)  # every voxel of the 2 mm box
    flat = bin_map.reshape(-1)[np.flatnonzero(np.ones(cortex_img.shape, bool).ravel())]
    assert len(ours.names) > 5
    for i, net in ours.names.items():
        if params.config.type == "Hard":
            label = sorted(np.unique(tb[tb > 0]))[sorted(ours.names).index(i)]
            tb_net = tb == label
        else:
            tb_net = np.asarray(tb[i - 1])
        want = ns["dice_coeff"](bin_map, tb_net)
        got = dice(flat, ours.mask_of(i))
        assert got == pytest.approx(want, abs=1e-12), net
        assert int(ours.mask_of(i).sum()) == int(np.sum(tb_net == 1)), net


@needs_nct
def test_tw_task_nets_follow_their_affine(nct_env, grid8):
    """TW_TASK_NETS volumes are stored RAS, the FSL grid and the other atlases LAS; the
    toolbox compares arrays and so mirrors them left-right. Ours follow the affine: the
    language network is left-lateralised in world coordinates, as it is in the brain."""
    a = load_atlas("nct:TW_TASK_NETS", grid8, grid8)
    ln = [i for i, n in a.names.items() if n == "Language(LN)"][0]
    ijk = np.argwhere(np.asarray(grid8.dataobj) > 0)[a.mask_of(ln)]
    x = ijk @ grid8.affine[:3, :3].T[:, 0] + grid8.affine[0, 3]
    assert (x < 0).sum() > 1.3 * (x > 0).sum()


def test_uncached_atlas_is_one_line_and_exit_66(tmp_path, monkeypatch, capsys):
    from bids_llm_encode.cli.run import main

    empty = tmp_path / "nct-empty"
    empty.mkdir()
    monkeypatch.setenv(NCT_ENV, str(empty))

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    bids = tmp_path / "bids"
    bids.mkdir()
    t0 = time.monotonic()
    code = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                 "--fbn-atlas", "nct:AS400K17"])
    err = capsys.readouterr().err.strip()
    assert code == 66
    assert time.monotonic() - t0 < 20
    assert len(err.splitlines()) == 1, err
    assert "nct:AS400K17" in err and "prefetch" in err and str(empty) in err
    assert "datasets.prefetch_all()" in err


def test_unknown_nct_name_is_refused(tmp_path, monkeypatch, capsys):
    from bids_llm_encode.cli.run import main

    monkeypatch.setenv(NCT_ENV, str(tmp_path))
    (tmp_path / "bids").mkdir()
    code = main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w",
                 str(tmp_path / "w"), "--fbn-atlas", "nct:NOPE"])
    err = capsys.readouterr().err
    assert code != 0 and "NOPE" in err and "AS400K17" in err
    assert len(NCT_ATLASES) == 26


def test_bundled_default_has_language_auditory_default(grid8):
    from bids_llm_encode.config import Settings

    assert Settings.default("fbn_atlas") == ["kong2019"]
    a = load_atlas("kong2019", grid8, grid8)
    want = {"Language", "Auditory", "DefaultA", "DefaultB", "DefaultC"}
    assert want <= set(a.names.values()) and len(a.names) == 17
    counts = a.counts()
    assert all(counts[n] > 0 for n in want)
    files = bundled_atlas_files()
    side = json.loads(files["json"].read_text())
    assert "MIT" in side["License"] and "AS400K17" in side["Source"] + side["Name"]
    img = nib.load(files["nii"])
    assert img.get_data_dtype() == np.int16 and img.shape == (91, 109, 91)
    table = pd.read_csv(files["tsv"], sep="\t")
    assert list(table["index"]) == list(range(1, 18))
    surf = load_atlas("kong2019", (40962, 40962))
    assert set(surf.names.values()) == set(a.names.values()) and surf.counts()["Language"] > 0


@needs_nct
def test_bundled_default_equals_the_toolbox_files(grid8, nct_env):
    """kong2019 is AS400K17 of the cache: same networks on the same voxels."""
    a = load_atlas("kong2019", grid8, grid8)
    b = load_atlas("nct:AS400K17", grid8, grid8)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.names == b.names
    sa = load_atlas("kong2019", (40962, 40962))
    sb = load_atlas("nct:AS400K17", (40962, 40962))
    np.testing.assert_array_equal(sa.labels, sb.labels)


def test_atlas_written_to_derivatives_recomputes(tmp_path, grid8, monkeypatch):
    """write_atlas_outputs: the dseg read back from disk gives the atlas the labels used."""
    from bids_llm_encode.imaging import load_bold
    from bids_llm_encode.outputs import write_atlas_outputs

    mask = tmp_path / "mask.nii.gz"
    nib.save(grid8, mask)
    shape = grid8.shape + (4,)
    bold = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).standard_normal(shape).astype(
        np.float32), grid8.affine), bold)
    _, geom = load_bold([str(bold)], str(mask), slice(0, 1))
    ent = {"sub": "01", "task": "pieman", "space": "MNI152NLin2009cAsym", "model": "m"}
    written = write_atlas_outputs(tmp_path / "func", ent, geom, {"atlas_specs": ["kong2019"]})
    dseg = tmp_path / "func" / "sub-01_task-pieman_space-MNI152NLin2009cAsym_atlas-kong2019_dseg.nii.gz"
    tsv = dseg.with_name(dseg.name.replace(".nii.gz", ".tsv"))
    assert str(dseg) in written and str(tsv) in written
    back = np.asarray(nib.load(dseg).dataobj)[np.asarray(grid8.dataobj) > 0]
    a = load_atlas("kong2019", grid8, grid8)
    np.testing.assert_array_equal(back, a.labels)
    table = pd.read_csv(tsv, sep="\t")
    assert dict(zip(table["index"], table["name"], strict=True)) == a.names
