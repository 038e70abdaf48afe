"""bids_inputs.py, the query layer, against facts of the REAL Narratives metadata (synthetic BOLD beside it)."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from bids_llm_encode.bids_inputs import find_scans, read_gentle
from bids_llm_encode.errors import (
    BidsValidationError,
    InputDataError,
    MissingInputError,
    NoMatchError,
)
from bids_llm_encode.timing import word_tr_index

from .conftest import NARRATIVES, add_clean_bold, requires_shared


@requires_shared
def test_every_pieman_scan_found_runs_kept_apart():
    specs = find_scans(NARRATIVES, task_labels=["pieman"], require_images=False)
    events = sorted(NARRATIVES.glob("sub-*/func/*task-pieman*_events.tsv"))
    assert len(specs) == len(events) == 96  # 82 participants, 14 of them with two runs
    assert len({s.subject for s in specs}) == 82
    two_runs = [s for s in specs if s.subject == "001"]
    assert sorted(s.run for s in two_runs) == [1, 2]
    assert len({s.scan_id for s in specs}) == 96


@requires_shared
def test_tr_read_from_sidecar_milkyway_synonyms():
    specs = find_scans(NARRATIVES, task_labels=["milkyway"], require_images=False)
    by_sub = {s.subject: s for s in specs}
    for n in range(115, 132):
        spec = by_sub[f"{n:03d}"]
        assert spec.tr == pytest.approx(1.52)
        assert spec.stimulus == "milkywaysynonyms"
    assert {s.tr for s in specs if int(s.subject) < 115} == {1.5}
    assert {s.stimulus for s in specs} == {"milkywayoriginal", "milkywayvodka", "milkywaysynonyms"}


@requires_shared
def test_pieman_first_word_and_word_counts():
    spec = find_scans(NARRATIVES, ["002"], ["pieman"], require_images=False)[0]
    assert spec.words["word"].iloc[0] == "I"
    assert spec.words["onset"].iloc[0] == pytest.approx(15.09, abs=1e-3)
    # word 0 is in TR 10 ([15.0, 16.5) s)
    assert word_tr_index(spec.words["onset"].to_numpy()[:1], spec.tr, 300)[0] == 10
    for align in sorted((NARRATIVES / "stimuli" / "gentle").glob("*/align.csv")):
        rows = sum(1 for line in open(align, newline="") if line.strip())
        table = read_gentle(align)
        assert len(table) == rows, align
        assert table["start"].notna().all()  # unplaced words are interpolated, never dropped
        assert table["start"].is_monotonic_increasing or table["aligned"].all() is False


@requires_shared
def test_unplaced_words_interpolated_between_neighbours():
    table = read_gentle(NARRATIVES / "stimuli" / "gentle" / "pieman" / "align.csv")
    lost = table.index[~table["aligned"]]
    assert len(lost) == 3
    for i in lost:
        assert table["start"][i - 1] <= table["start"][i] <= table["start"][i + 1]


@requires_shared
def test_query_with_images(narratives_copy):
    add_clean_bold(narratives_copy, "001", "pieman", run=1)
    add_clean_bold(narratives_copy, "001", "pieman", run=2)
    add_clean_bold(narratives_copy, "020", "pieman")
    specs = find_scans(narratives_copy, ["sub-001", "020"], ["pieman"])
    assert [s.scan_id for s in specs] == [
        "sub-001_task-pieman_run-1", "sub-001_task-pieman_run-2", "sub-020_task-pieman"]
    assert all(s.n_trs == 300 and s.tr == 1.5 and len(s.words) == 957 for s in specs)
    assert specs[0].bold[0] != specs[1].bold[0]


@requires_shared
def test_scan_exclude_honoured_and_overridable(narratives_copy):
    add_clean_bold(narratives_copy, "001", "pieman", run=1)
    add_clean_bold(narratives_copy, "001", "pieman", run=2)
    (narratives_copy / "code").mkdir()
    (narratives_copy / "code" / "scan_exclude.json").write_text(
        '{"pieman": {"sub-001": ["sub-001_task-pieman_run-1"]}}')
    kept = find_scans(narratives_copy, ["001"], ["pieman"])
    assert [s.run for s in kept] == [2]
    assert [s.run for s in find_scans(narratives_copy, ["001"], ["pieman"], exclude=False)] == [1, 2]


# ------------------------------------------------------------------ bad input
def test_missing_bids_dir(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        find_scans(tmp_path / "nope")


def test_not_bids(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(BidsValidationError, match="dataset_description.json"):
        find_scans(tmp_path / "data")


@requires_shared
def test_unknown_participant(narratives_copy):
    with pytest.raises(NoMatchError, match="999") as err:
        find_scans(narratives_copy, ["999"], ["pieman"], require_images=False)
    assert err.value.exit_code == 18


@requires_shared
def test_missing_alignment_names_expected_path(narratives_copy):
    import shutil

    shutil.rmtree(narratives_copy / "stimuli" / "gentle" / "lucy")
    with pytest.raises(MissingInputError, match=r"stimuli/gentle/lucy/align\.json"):
        find_scans(narratives_copy, task_labels=["lucy"], require_images=False)


@requires_shared
def test_bold_shorter_than_story(narratives_copy):
    add_clean_bold(narratives_copy, "020", "pieman", n_trs=280)
    with pytest.raises(InputDataError, match="12 TRs short"):
        # the pieman story ends at 437 s = 292 TRs of 1.5 s
        find_scans(narratives_copy, ["020"], ["pieman"])


@requires_shared
def test_broken_datalad_symlink(narratives_copy):
    path = add_clean_bold(narratives_copy, "020", "pieman")
    path.unlink()
    os.symlink("../../../.git/annex/objects/XX/missing.nii.gz", path)
    with pytest.raises(MissingInputError, match="datalad get") as err:
        find_scans(narratives_copy, ["020"], ["pieman"])
    assert path.name in str(err.value)


def test_word_table_columns_from_json(tmp_path):
    import json

    from bids_llm_encode.bids_inputs import words_in_scan_time

    path = tmp_path / "align.json"
    path.write_text(json.dumps({"transcript": "a b c", "words": [
        {"word": "a", "case": "success", "start": 1.0, "end": 1.2},
        {"word": "b", "case": "not-found-in-audio"},
        {"word": "c", "case": "success", "start": 2.0, "end": 2.4}]}))
    words = words_in_scan_time(read_gentle(path), audio_onset=3.0)
    assert list(words.columns) == ["word", "onset", "offset", "aligned"]
    assert words["onset"].tolist() == pytest.approx([4.0, 4.5, 5.0])
    assert words["aligned"].tolist() == [True, False, True]
    assert isinstance(words, pd.DataFrame)


@requires_shared
def test_query_fsaverage6_gifti(narratives_copy):
    """fsaverage6: one GIFTI per hemisphere (one data array per TR), medial wall NaN."""
    import nibabel as nib
    import numpy as np

    from bids_llm_encode.imaging import load_bold

    func = narratives_copy / "derivatives" / "afni-nosmooth" / "sub-020" / "func"
    func.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for hemi in "LR":
        data = rng.standard_normal((300, 50)).astype(np.float32)
        data[:, :5] = np.nan  # "medial wall"
        img = nib.GiftiImage(darrays=[nib.gifti.GiftiDataArray(row) for row in data])
        nib.save(img, func / f"sub-020_task-pieman_space-fsaverage6_hemi-{hemi}_desc-clean.func.gii")
    spec = find_scans(narratives_copy, ["020"], ["pieman"], space="fsaverage6")[0]
    assert [os.path.basename(b)[:40] for b in spec.bold] == [
        "sub-020_task-pieman_space-fsaverage6_hem"] * 2
    assert "hemi-L" in spec.bold[0] and "hemi-R" in spec.bold[1]
    assert spec.n_trs == 300 and spec.mask is None
    Y, geom = load_bold(spec.bold, None)
    assert Y.shape == (300, 90) and geom.kind == "surface"  # NaN vertices left out
    maps = geom.to_images(np.arange(90, dtype=float))
    assert set(maps) == {"L", "R"} and len(maps["L"].darrays) == 1
    paths = []
    for hemi, img in sorted(maps.items()):
        paths.append(str(narratives_copy / f"map_hemi-{hemi}.func.gii"))
        nib.save(img, paths[-1])
    np.testing.assert_array_equal(geom.from_images(paths)[0], np.arange(90))


# --------------------------------------------------------------------------- --bids-filter-file
def _events_runs(root, pattern):
    """The oracle: scans named by glob over the real tree (no pybids)."""
    return sorted(p.name.replace("_events.tsv", "") for p in root.glob(f"sub-*/func/{pattern}"))


@requires_shared
def test_bids_filter_selects_runs_on_real_narratives():
    """fMRIPrep semantics on the real tree: {"bold": {"run": 1}} keeps the run-1 scans,
    run null keeps the scans without a run entity, "events" narrows subjects and tasks."""
    run1 = find_scans(NARRATIVES, task_labels=["pieman"], require_images=False,
                      bids_filters={"bold": {"run": 1}})
    assert sorted(s.scan_id for s in run1) == _events_runs(NARRATIVES,
                                                           "*task-pieman_run-1_events.tsv")
    assert len(run1) == 14
    no_run = find_scans(NARRATIVES, task_labels=["pieman"], require_images=False,
                        bids_filters={"bold": {"run": None}})
    assert sorted(s.scan_id for s in no_run) == _events_runs(NARRATIVES,
                                                             "*task-pieman_events.tsv")
    assert len(no_run) == 96 - 2 * 14
    two = find_scans(NARRATIVES, require_images=False,
                     bids_filters={"events": {"subject": ["001", "002"], "task": "pieman"}})
    assert [s.scan_id for s in two] == ["sub-001_task-pieman_run-1", "sub-001_task-pieman_run-2",
                                        "sub-002_task-pieman_run-1", "sub-002_task-pieman_run-2"]
    with pytest.raises(NoMatchError, match="bids-filter-file leaves no task"):
        find_scans(NARRATIVES, task_labels=["pieman"], require_images=False,
                   bids_filters={"bold": {"task": "lucy"}})


def test_bids_filter_applies_to_the_preprocessed_bold(narratives_copy):
    add_clean_bold(narratives_copy, "001", "pieman", run=1)
    add_clean_bold(narratives_copy, "001", "pieman", run=2)
    specs = find_scans(narratives_copy, ["001"], ["pieman"], bids_filters={"bold": {"run": 2}})
    assert [s.run for s in specs] == [2]
    assert os.path.basename(specs[0].bold[0]).startswith("sub-001_task-pieman_run-2_space-")


@pytest.mark.parametrize("text, says", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"T1w": {"run": 1}}', "unknown input kind 'T1w'"),
    ('{"bold": {"sesion": "01"}}', "bold.sesion is not a pybids entity"),
    ('{"bold": {"space": "MNI"}}', "use --space"),
    ('{"bold": {"run": {"a": 1}}}', "must be a string, an integer"),
    ('{"bold": [1]}', "must map entity names"),
])
def test_bad_bids_filter_file_one_line(tmp_path, text, says):
    from bids_llm_encode.bids_inputs import load_bids_filters
    from bids_llm_encode.errors import UsageError

    path = tmp_path / "filter.json"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        load_bids_filters(path)
    msg = str(err.value)
    assert says in msg and str(path) in msg and "\n" not in msg
    assert err.value.exit_code == 64
    with pytest.raises(MissingInputError, match="does not exist"):
        load_bids_filters(tmp_path / "none.json")


# --------------------------------------------------------------------------- --bids-database-dir
def test_bids_database_dir_built_once_then_loaded(narratives_copy, tmp_path):
    """The first run indexes into the folder; a later run loads that index (it does not
    re-index: a scan added since is invisible until the folder is deleted, and the sqlite
    file is not rewritten); an existing empty folder is fine."""
    import time

    db = tmp_path / "pybids_db"
    db.mkdir()  # safe if it already exists
    t0 = time.perf_counter()
    first = find_scans(narratives_copy, task_labels=["pieman"], require_images=False,
                       database_dir=db)
    t_build = time.perf_counter() - t0
    (index,) = db.glob("*/layout_index.sqlite")
    stamp = (index.stat().st_mtime_ns, index.stat().st_size)
    assert not [p for p in db.iterdir() if p.name.startswith(".")]  # no temp folder left
    # a new scan appears on disk after indexing
    func = narratives_copy / "sub-001" / "func"
    for suffix in ("events.tsv", "bold.json"):
        src = func / f"sub-001_task-pieman_run-1_{suffix}"
        (func / f"sub-001_task-pieman_run-3_{suffix}").write_bytes(src.read_bytes())
    t0 = time.perf_counter()
    again = find_scans(narratives_copy, task_labels=["pieman"], require_images=False,
                       database_dir=db)
    t_load = time.perf_counter() - t0
    assert [s.scan_id for s in again] == [s.scan_id for s in first]  # loaded, not re-indexed
    assert (index.stat().st_mtime_ns, index.stat().st_size) == stamp
    fresh = find_scans(narratives_copy, task_labels=["pieman"], require_images=False)
    assert len(fresh) == len(first) + 1  # without the database the new scan is seen
    print(f"index built in {t_build:.2f} s, loaded in {t_load:.2f} s")
