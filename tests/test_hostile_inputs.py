"""Hostile inputs: each bad input ends in ONE line naming the file (and row / field), a
documented exit code, and no traceback, before any step of the graph runs.

One table (``CASES``): how to break a small simulated dataset, the exit code, a fragment
of the message. Plus the interruption pieces: the work-folder lock, crash files of
earlier runs, workers dying with a killed parent, and bad volumes interpolated.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_llm_encode.cli.run import main

SUB1 = Path("sub-001/func/sub-001_task-pieman")
DERIV_BOLD = Path("derivatives/afni-nosmooth/sub-001/func/"
                  "sub-001_task-pieman_space-MNI152NLin2009cAsym_res-native_desc-clean_bold.nii.gz")
GENTLE = Path("stimuli/gentle/pieman")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    from bids_llm_encode.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("hostile") / "ds"
    simulate_dataset(root, n_participants=2, resolution=8, progress=False)
    return root


@pytest.fixture
def ds(simulated, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(simulated, root)
    return root


# ----------------------------------------------------------------------------- breakers
def _json_only(ds):
    (ds / GENTLE / "align.csv").unlink()


def _csv_only(ds):
    (ds / GENTLE / "align.json").unlink()


def _edit_json(ds, edit):
    path = ds / GENTLE / "align.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_csv_row(ds, row, new):
    _csv_only(ds)
    path = ds / GENTLE / "align.csv"
    lines = path.read_text().splitlines()
    lines[row - 1] = new(lines[row - 1])
    path.write_text("\r\n".join(lines) + "\r\n")


def _events(ds, text):
    (ds / f"{SUB1}_events.tsv").write_text(text)


def _sidecar(ds, tr):
    path = ds / f"{SUB1}_bold.json"
    meta = json.loads(path.read_text())
    meta["RepetitionTime"] = tr
    path.write_text(json.dumps(meta))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _shuffle_times(data):
    words = [w for w in data["words"] if w.get("case") == "success"]
    starts = [w["start"] for w in words]
    rng = np.random.default_rng(0)
    for w, s in zip(words, rng.permutation(starts)):
        w["start"] = float(s)
        w["end"] = float(s) + 0.1


def _set_start(i, value):
    def edit(data):
        words = [w for w in data["words"] if w.get("case") == "success"]
        words[i]["start"] = value
    return edit


def _row_of_success(ds, i):
    data = json.loads((ds / GENTLE / "align.json").read_text())
    return [k for k, w in enumerate(data["words"], 1) if w.get("case") == "success"][i]


# (id, breaker(ds, tmp_path) -> extra argv, exit code, message fragment)
CASES = [
    ("gentle-json-empty",
     lambda ds, t: (_json_only(ds), (ds / GENTLE / "align.json").write_text(""))[-1] and [],
     65, "align.json: the file is empty"),
    ("gentle-json-truncated",
     lambda ds, t: (_json_only(ds), _truncate(ds / GENTLE / "align.json")) and [],
     65, "not valid JSON (truncated?)"),
    ("gentle-json-non-numeric",
     lambda ds, t: (_json_only(ds), _edit_json(ds, _set_start(3, "abc"))) and [],
     65, "field start: 'abc' is not a time"),
    ("gentle-csv-time-typo",
     lambda ds, t: _edit_csv_row(ds, 5, lambda r: ",".join(r.split(",")[:2] + ["1o.5"]
                                                         + r.split(",")[3:])) or [],
     65, "align.csv: row 5 / field start: '1o.5' is not a time"),
    ("gentle-csv-row-without-time",
     lambda ds, t: _edit_csv_row(ds, 7, lambda r: "stray") or [],
     65, "align.csv: row 7: 1 field(s) where Gentle writes 4"),
    ("events-without-onset",
     lambda ds, t: _events(ds, "start\tduration\n0\t10\n") or [],
     65, "no 'onset' column"),
    ("events-header-only",
     lambda ds, t: _events(ds, "onset\tduration\ttrial_type\n") or [],
     65, "events.tsv: a header but no rows"),
    ("events-onset-na",
     lambda ds, t: _events(ds, "onset\tduration\ttrial_type\nn/a\t300\tstory\n") or [],
     65, "events.tsv: row 1 / field onset"),
    ("tr-with-unit", lambda ds, t: _sidecar(ds, "1.5s") or [], 65, "RepetitionTime '1.5s'"),
    ("tr-zero", lambda ds, t: _sidecar(ds, 0) or [], 65, "RepetitionTime 0 is not"),
    ("bold-truncated", lambda ds, t: _truncate(ds / DERIV_BOLD) or [], 65,
     "desc-clean_bold.nii.gz: cannot be read"),
    ("words-out-of-order",
     lambda ds, t: (_json_only(ds), _edit_json(ds, _shuffle_times)) and [],
     65, "go back in time"),
    ("events-missing-for-requested-participant",
     lambda ds, t: (ds / f"{SUB1}_events.tsv").unlink() or ["--participant-label", "001", "002"],
     18, "sub-001 has no usable scan (sub-001_task-pieman has BOLD but no events.tsv)"),
    ("output-folder-not-creatable",
     lambda ds, t: ((t / "afile").write_text("x"), ["--out", str(t / "afile" / "out")])[1],
     73, "cannot create the output folder"),
    ("work-folder-not-creatable",
     lambda ds, t: ((t / "afile").write_text("x"), ["-w", str(t / "afile" / "w")])[1],
     73, "cannot create the work folder"),
    ("hub-model-offline",
     lambda ds, t: ["--model", "nobody-here/no-such-model"], 66, "there is no network"),
]


@pytest.mark.parametrize("name,breaker,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_and_exit_code(name, breaker, code, fragment, ds, tmp_path,
                                          capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, work = tmp_path / "out", tmp_path / "work"
    extra = list(breaker(ds, tmp_path) or [])
    if "--out" in extra:
        i = extra.index("--out")
        out = Path(extra[i + 1])
        del extra[i:i + 2]
    got = main([str(ds), str(out), "participant", "-w", str(work), *extra])
    err = capsys.readouterr().err
    assert got == code, err
    assert fragment in err, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("bids_llm_encode: error:")]
    assert len(lines) == 1, err
    # failed before any step ran: no graph in the work folder, no participant outputs
    assert not list(work.glob("bids_llm_encode_wf*")) if work.exists() else True
    assert not (out / "sub-001").exists() if out.is_dir() else True


def test_words_beyond_scan_warn_then_fail(ds, tmp_path, caplog):
    """A few words past the last TR: a warning naming the count; most of them: exit 65."""
    from bids_llm_encode import checks
    from bids_llm_encode.bids_inputs import find_scans

    spec = find_scans(ds, ["001"])[0]
    end = spec.n_trs * spec.tr
    words = spec.words.copy()
    words.loc[words.index[-3:], "onset"] = end + 5.0  # 3 words beyond the scan
    counts = checks.check_word_timing(words, spec.n_trs, spec.tr, spec.scan_id, "align.json",
                                      0.2)
    assert counts["n_words_outside_scan"] == 3 and counts["n_words_out_of_order"] == 0
    assert "3 lie outside" in caplog.text
    # the limit is a setting: 3 words of the story is over a limit below 3/n
    limit = 2.5 / len(words)
    with pytest.raises(checks.InputDataError, match="3 lie outside.*--max-unusable-words"):
        checks.check_word_timing(words, spec.n_trs, spec.tr, spec.scan_id, "align.json", limit)
    words["onset"] = words["onset"] + end  # every word after the end of the scan
    with pytest.raises(checks.InputDataError, match=f"{len(words)} lie outside"):
        checks.check_word_timing(words, spec.n_trs, spec.tr, spec.scan_id, "align.json", 0.2)
    counts = checks.check_word_timing(words, spec.n_trs, spec.tr, spec.scan_id, "align.json",
                                      1.0)  # allowed: a warning only
    assert counts["n_words_outside_scan"] == len(words)


def test_max_unusable_words_option(tmp_path, capsys):
    """--max-unusable-words reaches Settings (default from Settings); outside [0, 1]: 64."""
    from bids_llm_encode.cli.parser import build_parser
    from bids_llm_encode.config import Settings

    p = build_parser()
    base = [str(tmp_path), str(tmp_path / "out"), "participant"]
    assert p.parse_args(base).max_unusable_words == Settings.default("max_unusable_words")
    assert p.parse_args(base + ["--max-unusable-words", "0.05"]).max_unusable_words == 0.05
    with pytest.raises(SystemExit) as exc:
        p.parse_args(base + ["--max-unusable-words", "1.5"])
    assert exc.value.code == 64 and "from 0 to 1" in capsys.readouterr().err
    # the slice-timing reference is a fraction of the TR too: refused before any work
    with pytest.raises(SystemExit) as exc:
        p.parse_args(base + ["--slice-time-ref", "1.5"])
    assert exc.value.code == 64 and "--slice-time-ref" in capsys.readouterr().err


# ----------------------------------------------------------------------------- group level
def _fake_participant_outputs(out: Path, subs, with_statmaps: bool):
    for sub in subs:
        func = out / f"sub-{sub}" / "func"
        func.mkdir(parents=True)
        prefix = f"sub-{sub}_task-pieman_space-MNI152NLin2009cAsym_model-smollm2"
        (func / f"{prefix}_networks.tsv").write_text("atom\tatlas\tnetwork\n")
        if with_statmaps:
            for stat in ("r2_desc-atoms", "effect_desc-atoms", "alpha"):
                (func / f"{prefix}_stat-{stat}_statmap.nii.gz").write_bytes(b"")


@pytest.mark.parametrize("subs,statmaps,code,fragment", [
    (["001"], True, 65, "the group level needs >= 2 participants"),
    (["001", "002"], False, 66, "_stat-r2_desc-atoms_statmap.nii.gz is missing"),
])
def test_group_inputs_checked_before_work(ds, tmp_path, capsys, subs, statmaps, code, fragment):
    out = tmp_path / "out"
    _fake_participant_outputs(out, subs, statmaps)
    got = main([str(ds), str(out), "group", "-w", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert got == code and fragment in err and "Traceback" not in err, err
    assert not (out / "group").exists()


# ----------------------------------------------------------------------------- interruption
def test_same_work_dir_is_locked(ds, tmp_path, capsys):
    """A second run on a -w another process holds exits 73 naming that process."""
    from bids_llm_encode.cli.workflow import LOCK_NAME

    work = tmp_path / "work"
    work.mkdir()
    fd = os.open(work / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running process holds
        os.pwrite(fd, b"424242\n", 0)
        got = main([str(ds), str(tmp_path / "out"), "participant", "-w", str(work)])
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert got == 73 and "process 424242" in err and "Traceback" not in err, err


def test_lock_released_after_a_run(tmp_path):
    from bids_llm_encode.cli.workflow import LOCK_NAME, work_lock

    with work_lock(tmp_path / "w"):
        assert (tmp_path / "w" / LOCK_NAME).read_text().strip() == str(os.getpid())
    with work_lock(tmp_path / "w"):  # free again: a rerun may take it
        pass


def test_old_crash_files_archived_not_reported(tmp_path):
    from bids_llm_encode.cli.workflow import archive_old_crashes

    log = tmp_path / "out" / "sub-001" / "log"
    log.mkdir(parents=True)
    old = log / "crash-20260101-000000-root-encode_x-0000.txt"
    old.write_text("old failure")
    moved = archive_old_crashes(tmp_path / "out")
    assert moved == [log / "old" / old.name] and not old.exists()
    assert (log / "old" / old.name).read_text() == "old failure"
    assert archive_old_crashes(tmp_path / "out") == []  # archived ones stay put


def _crash(folder: Path, node: str, work: Path) -> Path:
    path = folder / f"crash-20260101-000000-root-{node}-00000000-0000-0000-0000-000000000000.txt"
    path.write_text(f"Node: bids_llm_encode_wf.{node}\nWorking directory: "
                    f"{work / 'bids_llm_encode_wf' / node}\n\nTraceback ...\n")
    return path


def test_crash_archiving_leaves_a_concurrent_runs_crashes(tmp_path):
    """Two runs with different -w into one output folder: the one starting archives the
    earlier runs' crash files, not those of the run still going on (its work lock held)."""
    from bids_llm_encode.cli.workflow import LOCK_NAME, archive_old_crashes, work_lock

    out, ours, other, gone = tmp_path / "out", tmp_path / "w1", tmp_path / "w2", tmp_path / "w3"
    log = out / "log"
    log.mkdir(parents=True)
    for w in (ours, other, gone):
        w.mkdir()
        (w / LOCK_NAME).write_text("")  # every run leaves its lock file behind
    mine = _crash(log, "encode_a", ours)
    theirs = _crash(log, "encode_b", other)
    finished = _crash(log, "encode_c", gone)  # a run on another -w that has ended
    unknown = log / "crash-20260101-000000-root-x-1.txt"
    unknown.write_text("no working directory line")
    fd = os.open(other / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other run is going on
    try:
        with work_lock(ours):
            moved = archive_old_crashes(out, ours)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert sorted(p.name for p in moved) == sorted(p.name for p in (mine, finished, unknown))
    assert theirs.exists() and not mine.exists() and not finished.exists()
    # once the other run has finished, its crash files are old too
    assert archive_old_crashes(out, ours) == [log / "old" / theirs.name]


class _WriteOut(SimpleInterface):
    """Writes ``out_dir/name`` (and counts its runs in ``out_dir/runs``)."""

    class input_spec(BaseInterfaceInputSpec):  # noqa: N801
        out_dir = traits.Str(mandatory=True)
        name = traits.Str(mandatory=True)

    class output_spec(TraitedSpec):  # noqa: N801
        out_files = OutputMultiObject(traits.Str)

    def _run_interface(self, runtime):
        folder = Path(self.inputs.out_dir)
        (folder / self.inputs.name).write_text("x")
        runs = folder / "runs"
        runs.write_text(str(int(runs.read_text() if runs.exists() else 0) + 1))
        self._results["out_files"] = [str(folder / self.inputs.name)]
        return runtime


def test_cached_node_with_missing_output_reruns(tmp_path):
    """A cached (not always_run) node, e.g. the group summary: a rerun reruns it when a
    file under output_dir that it wrote is gone, and only then."""
    from nipype.pipeline import engine as pe

    from bids_llm_encode.cli.workflow import rerun_if_outputs_missing

    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()

    def build():
        wf = pe.Workflow("wf", base_dir=str(tmp_path / "work"))
        wf.add_nodes([pe.Node(_WriteOut(out_dir=str(out), name="group.tsv"), name="summary"),
                      pe.Node(_WriteOut(out_dir=str(scratch), name="tmp.txt"), name="other")])
        return wf

    wf = build()
    assert rerun_if_outputs_missing(wf, out) == []  # never run: nipype decides
    wf.run()
    assert (out / "runs").read_text() == "1"
    wf = build()
    assert rerun_if_outputs_missing(wf, out) == []  # all there: cached
    wf.run()
    assert (out / "runs").read_text() == "1"
    (out / "group.tsv").unlink()
    (scratch / "tmp.txt").unlink()  # not under output_dir: not our business
    wf = build()
    assert rerun_if_outputs_missing(wf, out) == ["summary"]
    wf.run()
    assert (out / "group.tsv").exists() and (out / "runs").read_text() == "2"
    assert (scratch / "runs").read_text() == "1"


def test_word_timing_warning_in_participant_report(tmp_path):
    """Words beyond the scan (extraction sidecar in atoms/*_atoms.json): a warning box."""
    from bids_llm_encode.reports.page import Page
    from bids_llm_encode.reports.participant import _word_timing_warning

    tsv = tmp_path / "task-pieman_model-smollm2_atoms.tsv"
    tsv.write_text("onset\tatom01\n0\t1\n")
    extraction = {"n_words": 1000, "n_words_outside_scan": 101, "n_trs": 236, "tr": 1.5}
    (tmp_path / "task-pieman_model-smollm2_atoms.json").write_text(
        json.dumps({"Extraction": extraction}))
    page = Page(tmp_path, tmp_path / "figures", "t")
    _word_timing_warning(page, tsv)
    html = "".join(page.parts)
    assert "word-timing" in html and "101 of 1000 words lie outside the scan (236 TRs" in html
    extraction["n_words_outside_scan"] = 0
    (tmp_path / "task-pieman_model-smollm2_atoms.json").write_text(
        json.dumps({"Extraction": extraction}))
    page = Page(tmp_path, tmp_path / "figures", "t")
    _word_timing_warning(page, tsv)
    assert not page.parts  # nothing to say: no box


def test_sinks_and_reports_always_rerun():
    """A rerun rewrites deleted outputs: nipype never reuses a cached sink or report."""
    from nipype.pipeline import engine as pe

    from bids_llm_encode.interfaces.derivatives import (
        WriteParticipantOutputs,
        WriteStimulusOutputs,
    )
    from bids_llm_encode.interfaces.extraction import ExtractResponses
    from bids_llm_encode.interfaces.reports import GroupReport, ParticipantReport

    for cls in (WriteStimulusOutputs, WriteParticipantOutputs, ParticipantReport, GroupReport):
        node = pe.Node(cls(), name="n")
        assert node.overwrite is None and node.interface.always_run, cls
    assert not ExtractResponses().always_run  # the expensive steps stay cached


ORPHAN_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    from concurrent.futures import ProcessPoolExecutor

    def work(_):
        time.sleep(120)

    if __name__ == "__main__":
        mp.set_forkserver_preload(sys.argv[1:])
        ex = ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver"))
        futures = [ex.submit(work, i) for i in range(2)]
        time.sleep(3)
        print(os.getpid(), flush=True)
        os.kill(os.getpid(), 9)
""")


def _children_of_forkserver(tag: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "multiprocessing.forkserver" in cmd and tag in cmd:
                pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_workers_die_with_killed_parent(tmp_path):
    """kill -9 of the main process: the forkserver (preloading cli.pdeathsig, as
    FORKSERVER_PRELOAD does) and its workers are gone within seconds."""
    from bids_llm_encode.cli.workflow import FORKSERVER_PRELOAD

    assert "bids_llm_encode.cli.pdeathsig" in FORKSERVER_PRELOAD
    script = tmp_path / "orphans.py"
    script.write_text(ORPHAN_SCRIPT)
    tag = f"'{tmp_path.name}'"  # a harmless extra preload name that marks our processes
    proc = subprocess.run([sys.executable, str(script), "bids_llm_encode.cli.pdeathsig",
                           tmp_path.name], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and proc.stdout.strip().isdigit(), proc.stderr
    for _ in range(50):
        left = _children_of_forkserver(tag)
        if not left:
            break
        time.sleep(0.1)
    for pid in left:  # do not leak them if the test fails
        os.kill(pid, 9)
    assert not left, f"orphaned forkserver/workers: {left}"


# ----------------------------------------------------------------------------- bad volumes
def test_all_nan_volume_interpolated_and_recorded(tmp_path, caplog):
    import nibabel as nib

    from bids_llm_encode.imaging import load_bold

    rng = np.random.default_rng(1)
    data = (100 + rng.standard_normal((3, 3, 3, 12))).astype(np.float32)
    data[..., 5] = np.nan
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    Y, geom = load_bold([str(path)], None)
    assert geom.bad_volumes == (5,)
    assert np.isfinite(Y).all() and Y.shape == (12, 27)
    expected = (data[..., 4] + data[..., 6]).reshape(-1) / 2  # midpoint of its neighbours
    np.testing.assert_allclose(Y[5], expected, rtol=1e-6)
    assert "1 volume(s) with no finite signal (TR 5)" in caplog.text


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_deleted_outputs_rewritten_on_rerun(ds, tmp_path):
    """Resume trusts the outputs, not the work folder: delete the participant's outputs
    and rerun with the same -w: every file comes back with identical tables and maps."""
    import hashlib

    import nibabel as nib

    out, work = tmp_path / "out", tmp_path / "work"
    args = [str(ds), str(out), "participant", "--participant-label", "001", "-w", str(work),
            "--n-null", "100", "--nprocs", "2"]
    assert main(args) == 0
    written = sorted(p for p in out.rglob("*") if p.is_file() and "log" not in p.parts
                     and p.name != "dataset_description.json")
    assert any(p.name.endswith("_networks.tsv") for p in written)
    assert any(p.name.endswith("_statmap.nii.gz") for p in written)
    assert any(p.suffix == ".html" for p in written)
    tables = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in written
              if p.suffix in (".tsv", ".json")}
    maps = {p: np.asarray(nib.load(p).dataobj) for p in written if p.name.endswith(".nii.gz")}
    for p in written:
        p.unlink()
    assert main(args) == 0
    missing = [str(p.relative_to(out)) for p in written if not p.exists()]
    assert not missing, missing
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tables} == tables
    for p, before in maps.items():
        np.testing.assert_array_equal(np.asarray(nib.load(p).dataobj), before, err_msg=str(p))
