"""The command line: --help, --version, and every documented exit code on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bids_llm_encode import __version__
from bids_llm_encode.cli.parser import build_parser
from bids_llm_encode.cli.run import main
from bids_llm_encode.errors import AppError

from .conftest import add_clean_bold, requires_shared


def test_help_explains_every_option_with_default(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for opt in ("--participant-label", "--task-label", "--model", "--work-dir", "--nprocs",
                "--mem-mb", "--skip-bids-validation", "--version", "--units",
                "--context-tokens", "--n-atoms", "--alpha-an", "--folds", "--fbn-atlas",
                "--n-null", "--use-plugin", "--derivatives", "--space", "--no-exclude"):
        assert opt in text, opt
    assert "default: smollm2" in text and "default: 64" in text and "exit codes" in text
    # every option with a non-None default says what it is
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, True, "==SUPPRESS=="):
            if action.dest in ("help", "version", "verbose"):
                continue
            assert "default" in (action.help or ""), action.dest


def test_version_console_script():
    out = subprocess.run([sys.executable, "-m", "bids_llm_encode.cli.run", "--version"],
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"bids_llm_encode {__version__}"


def test_both_label_spellings_parse():
    p = build_parser()
    a = p.parse_args(["b", "o", "participant", "--participant_label", "sub-01", "02"])
    b = p.parse_args(["b", "o", "participant", "--participant-label", "01", "02"])
    assert a.participant_label == ["sub-01", "02"] and b.participant_label == ["01", "02"]


def test_participant_labels_from_a_file(tmp_path, capsys):
    """--participant-label @FILE or a .txt path: labels split on white space, # comments,
    mixed with labels given inline; a missing or empty file is a usage error (exit 64)."""
    listing = tmp_path / "subjects.txt"
    listing.write_text("sub-001 002\n# left out: 003\n\n004  # trailing comment\n")
    p = build_parser()
    a = p.parse_args(["b", "o", "participant", "--participant-label", f"@{listing}"])
    b = p.parse_args(["b", "o", "participant", "--participant-label", "009", str(listing)])
    assert a.participant_label == ["sub-001", "002", "004"]
    assert b.participant_label == ["009", "sub-001", "002", "004"]
    (tmp_path / "empty.txt").write_text("# nobody\n")
    for bad, says in ((f"@{tmp_path / 'none.txt'}", "cannot read"),
                      (str(tmp_path / "empty.txt"), "holds no label")):
        with pytest.raises(SystemExit) as exc:
            p.parse_args(["b", "o", "participant", "--participant-label", bad])
        assert exc.value.code == 64 and says in capsys.readouterr().err


def test_unknown_level_exits_17(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "out"), "subject"]) == 17
    assert "unknown analysis level" in capsys.readouterr().err


def test_bad_usage_exits_64(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), str(tmp_path / "o"), "participant", "--n-atoms", "zero"])
    assert exit_.value.code == 64


def test_missing_bids_dir_exits_66(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 66
    err = capsys.readouterr().err
    assert "nope" in err and err.count("\n") == 1


def test_not_bids_exits_16(tmp_path, capsys):
    (tmp_path / "notbids").mkdir()
    assert main([str(tmp_path / "notbids"), str(tmp_path / "out"), "participant"]) == 16
    assert "dataset_description.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("inside", [".", "derivatives", "sub-01", "sourcedata/x",
                                    "derivatives/afni-nosmooth", "derivatives/afni-nosmooth/x"])
def test_output_inside_bids_dir_refused(tmp_path, capsys, inside):
    (tmp_path / "bids").mkdir()
    code = main([str(tmp_path / "bids"), str(tmp_path / "bids" / inside), "participant"])
    assert code == 64
    assert "bids_dir" in capsys.readouterr().err or inside.startswith("derivatives/")
    assert not (tmp_path / "bids" / "derivatives").exists()
    assert sorted(p.name for p in (tmp_path / "bids").iterdir()) == []


def test_output_in_bids_dir_derivatives_accepted(tmp_path):
    from bids_llm_encode.cli.run import settings_from_args

    bids = tmp_path / "bids"
    bids.mkdir()
    out = bids / "derivatives" / "bids_llm_encode"
    args = build_parser().parse_args([str(bids), str(out), "participant",
                                      "-w", str(tmp_path / "work")])
    settings = settings_from_args(args)
    assert settings.output_dir == out.resolve() and settings.bids_dir == bids.resolve()


@requires_shared
def test_outputs_in_bids_dir_derivatives_not_indexed(narratives_copy):
    """Our own outputs under bids_dir/derivatives/<name> never look like inputs."""
    from bids_llm_encode.bids_inputs import find_scans

    add_clean_bold(narratives_copy, "020", "pieman")
    before = find_scans(narratives_copy, participant_labels=["020"], task_labels=["pieman"])
    own = narratives_copy / "derivatives" / "bids_llm_encode" / "sub-zz9" / "func"
    own.mkdir(parents=True)
    (own / "sub-zz9_task-pieman_events.tsv").write_text("onset\tduration\n0\t1\n")
    add_clean_bold(narratives_copy / "derivatives" / "bids_llm_encode", "020", "pieman")
    after = find_scans(narratives_copy, participant_labels=["020"], task_labels=["pieman"])
    assert [s.bold for s in after] == [s.bold for s in before] and len(before) == 1
    with pytest.raises(AppError):  # sub-zz9 exists only in our outputs
        find_scans(narratives_copy, participant_labels=["zz9"], task_labels=["pieman"])


@requires_shared
def test_unknown_participant_exits_18(narratives_copy, tmp_path, capsys):
    add_clean_bold(narratives_copy, "020", "pieman")
    code = main([str(narratives_copy), str(tmp_path / "out"), "participant",
                 "--participant-label", "sub-999", "-w", str(tmp_path / "work")])
    assert code == 18
    assert "999" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_group_before_participant(tmp_path, capsys):
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.8.0"}')
    (tmp_path / "out").mkdir()
    code = main([str(tmp_path / "bids"), str(tmp_path / "out"), "group"])
    assert code == 66
    assert "run the 'participant' level first" in capsys.readouterr().err


def test_unknown_model_named_before_any_work(tmp_path, capsys):
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.8.0"}')
    code = main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
                 "--model", "gpt-nonexistent", "-w", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 64 and "smollm2" in err and "minilm" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_default_atlas_is_not_refused_on_fsaverage6(tmp_path, capsys):
    """kong2019 (the default) comes on fsaverage6 too: the volume-atlas check lets it by."""
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.8.0"}')
    main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--space",
          "fsaverage6", "-w", str(tmp_path / "work")])
    assert "is a volume atlas" not in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--null", "spin"], "needs --space fsaverage6"),
    (["--space", "fsaverage6", "--fbn-atlas", "seitzman2018"], "GIFTI dseg per hemisphere"),
])
def test_space_null_and_atlas_mismatch_exit_64(tmp_path, capsys, args, says):
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.8.0"}')
    code = main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", *args])
    err = capsys.readouterr().err
    assert code == 64 and says in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_failing_node_is_named_and_exit_1(tmp_path, capsys):
    """A step that fails inside the graph: exit 1, the node named, crash file as text."""
    import shutil

    import nibabel as nib
    import numpy as np

    from .conftest import NARRATIVES

    if not NARRATIVES.is_dir():
        pytest.skip(f"real Narratives metadata not found at {NARRATIVES}")
    bids = tmp_path / "bids"
    shutil.copytree(NARRATIVES, bids)
    bold = add_clean_bold(bids, "020", "pieman")
    # a brain mask on another grid than the BOLD: encoding must refuse it
    tpl = bids / "derivatives" / "afni-nosmooth" / "tpl-MNI152NLin2009cAsym"
    tpl.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)),
             tpl / "tpl-MNI152NLin2009cAsym_res-pieman_desc-brain_mask.nii.gz")
    assert bold.exists()
    code = main([str(bids), str(tmp_path / "out"), "participant", "--participant-label", "020",
                 "-w", str(tmp_path / "work"), "--n-atoms", "4", "--n-null", "20",
                 "--no-reports"])
    err = capsys.readouterr().err
    assert code == 1
    assert "encode_sub_020_task_pieman" in err and "crash" in err
    assert list((tmp_path / "out" / "sub-020" / "log").glob("crash-*.txt"))


def test_help_and_errors_document_65_and_73(capsys):
    from bids_llm_encode import errors

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "65 input data unusable" in text and "73 cannot create" in text
    assert errors.InputDataError("x").exit_code == errors.EXIT_DATA_ERROR == 65
    assert errors.OutputError("x").exit_code == errors.EXIT_CANT_CREATE == 73


def test_bad_bids_filter_file_one_line_before_any_work(tmp_path, capsys):
    """A filter file with an unknown kind: exit 64, one line naming the file, nothing written;
    both options reach Settings (as execution-only: they select scans, like the labels)."""
    from bids_llm_encode.cli.run import settings_from_args
    from bids_llm_encode.config import Settings

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    bad = tmp_path / "filter.json"
    bad.write_text('{"bold": {"run": 1}, "anat": {}}')
    code = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                 "--bids-filter-file", str(bad)])
    err = capsys.readouterr().err
    assert code == 64 and err.count("\n") == 1 and str(bad) in err and "'anat'" in err
    assert not (tmp_path / "out").exists()
    good = tmp_path / "ok.json"
    good.write_text('{"bold": {"run": 1}}')
    args = build_parser().parse_args([str(bids), str(tmp_path / "out"), "participant",
                                      "-w", str(tmp_path / "w"), "--bids-filter-file",
                                      str(good), "--bids-database-dir", str(tmp_path / "db")])
    settings = settings_from_args(args)
    assert settings.bids_filter_file == good and settings.bids_database_dir == tmp_path / "db"
    assert settings.scan_query()["bids_filters"] == {"bold": {"run": 1}}
    assert {"bids_filter_file", "bids_database_dir"} <= set(Settings.EXECUTION_ONLY)
    assert Settings.from_dict(settings.to_json()).bids_filter_file == good
