"""TemplateFlow is a real dependency: Schaefer 2018 and the fsaverage sphere come from
``templateflow.api.get``. Nothing downloads here: every check runs in a subprocess whose
$TEMPLATEFLOW_HOME is a temp folder (templateflow reads it when first imported) and whose
HTTP(S) proxy is a closed local port, so a download attempt fails at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("templateflow")

TPL = "tpl-MNI152NLin2009cAsym"
DESC = "400Parcels7Networks"
NII = f"{TPL}_res-02_atlas-Schaefer2018_desc-{DESC}_dseg.nii.gz"  # TemplateFlow's names
TSV = f"{TPL}_atlas-Schaefer2018_desc-{DESC}_dseg.tsv"

LOAD = """
import json, sys
import numpy as np, nibabel as nib
from bids_llm_encode.networks.atlases import load_atlas
import templateflow.api as tf
ref = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([2., 2., 2., 1.]))
try:
    a = load_atlas(sys.argv[1], ref, ref)
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "msg": str(exc),
                      "code": getattr(exc, "exit_code", None)}))
else:
    import templateflow.conf as conf
    got = tf.get("MNI152NLin2009cAsym", atlas="Schaefer2018", desc="%s", resolution=2,
                 suffix="dseg", extension=".nii.gz")
    print(json.dumps({"names": {str(k): v for k, v in a.names.items()}, "counts": a.counts(),
                      "source": a.meta["source"], "tf_home": str(conf.TF_HOME),
                      "tf_get": str(got)}))
""" % DESC


def _offline_env(home) -> dict:
    env = dict(os.environ, TEMPLATEFLOW_HOME=str(home), TEMPLATEFLOW_AUTOUPDATE="0",
               NO_PROXY="", no_proxy="")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        env[var] = "http://127.0.0.1:9"  # nothing listens: offline at once, no hang
    return env


def _load(spec, home):
    out = subprocess.run([sys.executable, "-c", LOAD, spec], env=_offline_env(home),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def _fake_schaefer(home):
    tpl = home / TPL
    tpl.mkdir(parents=True)
    dseg = np.zeros((4, 4, 4), np.int16)  # quadrants: parcels 1..4
    dseg[:2, :2], dseg[:2, 2:], dseg[2:, :2], dseg[2:, 2:] = 1, 2, 3, 4
    nib.save(nib.Nifti1Image(dseg, np.diag([2., 2., 2., 1.])), tpl / NII)
    pd.DataFrame({"index": [1, 2, 3, 4], "name": [
        "7Networks_LH_Vis_1", "7Networks_LH_Default_PFC_1", "7Networks_RH_Vis_1",
        "7Networks_RH_Default_Par_2"]}).to_csv(tpl / TSV, sep="\t", index=False)


def test_schaefer_comes_from_templateflow(tmp_path):
    home = tmp_path / "tf"
    _fake_schaefer(home)
    res, _ = _load("schaefer2018-7", home)
    assert res["tf_home"] == str(home)  # templateflow itself points at the temp home
    assert res["tf_get"] == str(home / TPL / NII)
    assert res["source"] == f"TemplateFlow {NII}"
    assert res["names"] == {"1": "Vis", "2": "Default"}
    assert res["counts"] == {"Vis": 32, "Default": 32}


@pytest.mark.parametrize("state", ["empty home", "zero-byte placeholder", "absent name"])
def test_schaefer_offline_and_absent_is_one_line(tmp_path, state):
    """Not there and no network: one line (exit 66) with the atlas name, the home and the
    command that prefetches it; no traceback, no download."""
    home = tmp_path / "tf"
    spec = "schaefer2018-17"
    if state == "zero-byte placeholder":  # what templateflow's skeleton holds
        _fake_schaefer(home)
        (home / TPL / NII.replace("7Networks", "17Networks")).write_bytes(b"")
    elif state == "absent name":  # a parcel count TemplateFlow does not have
        _fake_schaefer(home)
        spec = "schaefer2018-17-123"
    else:
        home.mkdir()
    res, stderr = _load(spec, home)
    assert res["error"] == "MissingInputError" and res["code"] == 66
    msg = res["msg"]
    assert "\n" not in msg and f"atlas {spec}" in msg.replace("-17-400", "-17")
    assert f"TEMPLATEFLOW_HOME={home}" in msg and "import templateflow.api as t; t.get(" in msg
    assert "Downloading" not in stderr  # templateflow's own chatter is kept off the console


def test_cli_refuses_an_absent_schaefer_before_any_work(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    home = tmp_path / "tf"
    home.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "bids_llm_encode.cli.run", str(bids), str(tmp_path / "out"),
         "participant", "-w", str(tmp_path / "w"), "--fbn-atlas", "schaefer2018-7"],
        env=_offline_env(home), capture_output=True, text=True, timeout=180)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 66, out.stderr[-2000:]
    assert len(lines) == 1 and "atlas schaefer2018-7-400" in lines[0], lines
    assert not (tmp_path / "out").exists()
