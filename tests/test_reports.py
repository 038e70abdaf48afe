"""HTML reports on a tiny fake derivatives folder named exactly as docs/outputs.md says.

The rendering test needs headless Chromium (Debian package ``chromium``); a session-scoped
helper tries ``apt-get install -y chromium`` once (as root only, allowed to fail) and the
test skips with the reason when it is still absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from bids_llm_encode import reports
from bids_llm_encode.config import Settings
from bids_llm_encode.errors import AppError
from bids_llm_encode.reports import figures, tables
from bids_llm_encode.reports.page import CSS_PATH, Page

MNI = "MNI152NLin2009cAsym"
SHAPE = (10, 12, 10)
AFFINE = np.array([[4.0, 0, 0, -20], [0, 4, 0, -24], [0, 0, 4, -20], [0, 0, 0, 1]])
NETWORKS = ["Default", "Auditory", "Visual"]
FS6 = 40962  # fsaverage6 vertices per hemisphere


# ------------------------------------------------------------------ fake derivatives

def _blob(center, width=2.0, sign=1.0):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    d2 = ((grid - np.asarray(center)) ** 2).sum(-1)
    return sign * np.exp(-d2 / (2 * width**2))


def _nifti(path: Path, data):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), AFFINE), path)


def _gifti(path: Path, arrays):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.gifti.GiftiImage(darrays=[
        nib.gifti.GiftiDataArray(np.asarray(a, np.float32)) for a in arrays])
    nib.save(img, path)


def _networks_table(n_atoms, significant, group=False):
    """Every atom x direction x network row; `significant` = {(atom, direction, network)}."""
    rng = np.random.default_rng(1)
    rows = []
    for atom in range(1, n_atoms + 1):
        for direction in ("activated", "deactivated"):
            for net in NETWORKS:
                sig = (atom, direction, net) in significant
                row = {"atom": atom, "atlas": "seitzman2018", "network": net,
                       "direction": direction, "dice": 0.3 + 0.3 * sig + 0.1 * rng.random(),
                       "p": 0.0004 if sig else 0.5, "q": 0.01 if sig else 0.8}
                if group:
                    row.update(n_participants=3 if sig else 1, fraction=1.0 if sig else 0.33)
                else:
                    row["n_voxels"] = 40
                rows.append(row)
    cols = (["atom", "atlas", "network", "direction", "n_participants", "fraction", "dice",
             "p", "q"] if group else
            ["atom", "atlas", "network", "direction", "dice", "p", "q", "n_voxels"])
    return pd.DataFrame(rows)[cols]


def _tsv(path: Path, frame: pd.DataFrame):
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False)


def _atoms_tsv(out: Path, task: str, model: str, k: int = 3, n_trs: int = 60):
    t = np.arange(n_trs) * 1.5
    table = pd.DataFrame({f"atom{j + 1:02d}": np.sin(t / (5 + 3 * j)) for j in range(k)})
    table /= np.linalg.norm(table.to_numpy(), axis=0)
    table.insert(0, "onset", t + 12.0)
    _tsv(out / "atoms" / f"task-{task}_model-{model}_atoms.tsv", table)


def _participant_volume(out: Path, sub: str, model: str, significant):
    func = out / f"sub-{sub}" / "func"
    stem = f"sub-{sub}_task-pieman_space-{MNI}_model-{model}"
    r2 = 0.3 * _blob((3, 4, 5), 3) + 0.1 * _blob((7, 8, 4), 2) - 0.02
    _nifti(func / f"{stem}_stat-r2_desc-atoms_statmap.nii.gz", r2)
    effect = np.stack([_blob((3, 4, 5)) - _blob((7, 8, 4)), _blob((6, 3, 6), 1.5),
                       -_blob((4, 9, 5), 1.5)], -1)
    _nifti(func / f"{stem}_stat-effect_desc-atoms_statmap.nii.gz", effect)
    _tsv(func / f"{stem}_networks.tsv", _networks_table(3, significant))


def _participant_surface(out: Path, sub: str, model: str):
    func = out / f"sub-{sub}" / "func"
    stem = f"sub-{sub}_task-pieman_space-fsaverage6_model-{model}"
    rng = np.random.default_rng(2)
    for hemi in "LR":
        _gifti(func / f"{stem}_hemi-{hemi}_stat-r2_desc-atoms_statmap.func.gii",
               [0.05 * rng.standard_normal(FS6) + 0.02])
        _gifti(func / f"{stem}_hemi-{hemi}_stat-effect_desc-atoms_statmap.func.gii",
               list(rng.standard_normal((3, FS6))))
    _tsv(func / f"{stem}_networks.tsv",
         _networks_table(3, {(2, "activated", "Auditory")}))


def _group(out: Path):
    g = out / "group"
    head = f"task-pieman_space-{MNI}"
    for model, sig in (("smollm2", {(1, "activated", "Default"), (3, "deactivated", "Visual")}),
                       ("minilm", set())):
        stem = f"{head}_model-{model}"
        _tsv(g / f"{stem}_networks.tsv", _networks_table(3, sig, group=True))
        _nifti(g / f"{stem}_stat-r2_desc-mean_statmap.nii.gz", 0.2 * _blob((3, 4, 5), 3))
        if model == "smollm2":  # minilm: t-maps and ceiling fraction missing (optional)
            t = np.stack([8 * _blob((3, 4, 5)), 5 * _blob((6, 3, 6)), -7 * _blob((4, 9, 5))], -1)
            _nifti(g / f"{stem}_stat-t_desc-atoms_statmap.nii.gz", t)
            (g / f"{stem}_stat-t_desc-atoms_statmap.json").write_text(
                json.dumps({"NumberOfParticipants": 10}))
            _nifti(g / f"{stem}_stat-r2_desc-ceilingfraction_statmap.nii.gz",
                   0.5 * _blob((3, 4, 5), 3))
    _nifti(g / f"{head}_stat-isc_desc-ceiling_statmap.nii.gz", 0.4 * _blob((3, 4, 5), 4))
    _tsv(g / f"{head}_networks-by-model.tsv", pd.DataFrame({
        "model": ["smollm2", "minilm"], "mean_r2": [0.021, 0.015],
        "fraction_atoms_labelled": [0.67, 0.0], "mean_abs_atom_corr": [0.12, 0.2],
        "note": ["a", "b"]}))


@pytest.fixture
def derivatives(tmp_path):
    out = tmp_path / "out"
    _participant_volume(out, "001", "smollm2",
                        {(1, "activated", "Default"), (1, "deactivated", "Visual"),
                         (3, "deactivated", "Auditory")})
    _participant_volume(out, "001", "minilm", set())  # no label: notes, no atom maps
    _atoms_tsv(out, "pieman", "smollm2")  # minilm atoms missing: optional, noted
    _participant_surface(out, "002", "smollm2")
    _group(out)
    settings = Settings(bids_dir=tmp_path / "bids", output_dir=out,
                        analysis_level=["participant", "group"])
    specs = [SimpleNamespace(subject=s, task="pieman", run=None, space=space,
                             scan_id=f"sub-{s}_task-pieman")
             for s, space in (("001", MNI), ("002", "fsaverage6"))]
    return settings, specs


# ------------------------------------------------------------------ helpers

class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.scripts, self.links = [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src"))
        elif tag == "script":
            self.scripts += 1
        elif tag == "link" and attrs.get("href"):
            self.links.append(attrs["href"])


def _check_html(path: Path) -> list[Path]:
    """The page exists, has no script/remote link/error note; every <img> is a local PNG."""
    from urllib.parse import unquote

    text = path.read_text()
    parser = _Images()
    parser.feed(text)
    assert parser.scripts == 0 and not parser.links
    err = text.find('class="report-error"')
    assert err < 0, text[err:err + 600]
    assert "http://" not in text and "https://" not in text
    pngs = []
    for src in parser.srcs:
        assert src and not src.startswith(("/", "data:", "http")), src
        png = path.parent / unquote(src)
        assert png.is_file() and png.suffix == ".png", src
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pngs.append(png)
    return pngs


@pytest.fixture(scope="session")
def chromium():
    """Path of headless Chromium; tries one best-effort apt-get install per session."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "chromium"], env=env,
                           capture_output=True, timeout=900)
        except (OSError, subprocess.SubprocessError):
            pass
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    return exe


def _screenshot(exe: str, page: Path, tmp_path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    shot = tmp_path / f"{page.stem}.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           f"--screenshot={shot}", "--window-size=1200,2000", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr}"
    return mpimg.imread(shot)


_OVERFLOW_JS = """<script>
window.addEventListener("load", function () {
  var width = document.documentElement.clientWidth, bad = [];
  document.querySelectorAll("body *").forEach(function (el) {
    var r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > width + 1) bad.push(el.tagName + " right " + r.right);
    if (el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1 &&
        getComputedStyle(el).overflowX === "visible")
      bad.push(el.tagName + "." + el.className + " " + el.scrollWidth + ">" + el.clientWidth);
  });
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return [i.getAttribute("src"), i.complete && i.naturalWidth > 0, i.clientWidth]; });
  var out = document.createElement("pre");
  out.id = "layout-check";
  out.textContent = JSON.stringify({scrollWidth: document.documentElement.scrollWidth,
                                    width: width, bad: bad, images: imgs});
  document.body.appendChild(out);
});
</script>"""


def _layout(exe: str, page: Path, tmp_path: Path) -> dict:
    """Render a copy of ``page`` (same folder, so its figures resolve) with a measuring
    script added (the report itself has none) in headless Chromium; --dump-dom returns
    what the script found: page width vs window, overflowing elements, images loaded."""
    probe = page.with_name(f"_probe_{page.name}")
    probe.write_text(page.read_text().replace("</body>", _OVERFLOW_JS + "</body>"))
    try:
        proc = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-dom'}",
             "--window-size=1200,2000", "--virtual-time-budget=10000", "--dump-dom",
             probe.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    finally:
        probe.unlink()
    import html as html_mod
    import re

    m = re.search(r'<pre id="layout-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"no layout result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html_mod.unescape(m.group(1)))


# ------------------------------------------------------------------ tests

@pytest.mark.slow
def test_reports_render(derivatives, chromium, tmp_path):
    settings, specs = derivatives
    out = settings.output_dir
    pages = reports.write_participant_reports(settings, specs)
    assert pages == [out / "sub-001.html", out / "sub-002.html"]
    group = reports.write_group_report(settings)
    assert group == out / "group.html"

    sub1 = pages[0].read_text()
    pngs = _check_html(pages[0])
    assert all(p.parent == out / "sub-001" / "figures" for p in pngs)
    names = {p.name for p in pngs}
    stem = f"sub-001_task-pieman_space-{MNI}_model-smollm2"
    assert {f"{stem}_desc-atoms_timecourses.png", f"{stem}_desc-r2_map.png",
            f"{stem}_atom-01_desc-effect_map.png", f"{stem}_atom-03_desc-effect_map.png",
            f"{stem}_desc-networks_matrix.png"} <= names
    assert f"{stem}_atom-02_desc-effect_map.png" not in names  # atom 2 has no label
    for text in ("Default", "Visual", "Auditory", "n_null", "map_threshold",
                 "no atom has a network label", "minilm_atoms.tsv"):
        assert text in sub1, text
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"

    sub2_pngs = _check_html(pages[1])  # fsaverage6: surfaces or histograms, never a crash
    assert any("atom-02" in p.name for p in sub2_pngs)

    group_pngs = _check_html(group)
    assert all(p.parent == out / "group" / "figures" for p in group_pngs)
    gnames = " ".join(p.name for p in group_pngs)
    for part in ("desc-ceiling_map", "desc-models_comparison", "smollm2_desc-meanr2_map",
                 "smollm2_desc-ceilingfraction_map", "smollm2_atom-01_desc-t_map",
                 "smollm2_atom-03_desc-t_map", "minilm_desc-networks_matrix"):
        assert part in gnames, part
    gtext = group.read_text()
    assert "fraction_atoms_labelled" in gtext and "no ceiling-fraction map" in gtext

    for page in (pages[0], group):
        # every figure loaded and shown; nothing wider than the 1200 px window
        layout = _layout(chromium, page, tmp_path)
        assert layout["images"] and all(ok and w > 100 for _, ok, w in layout["images"]), \
            layout["images"]
        assert layout["scrollWidth"] <= layout["width"], layout
        assert not layout["bad"], layout["bad"][:10]
        img = _screenshot(chromium, page, tmp_path)
        gray = img[..., :3].mean(-1)
        assert img.shape[0] >= 1000 and img.shape[1] >= 1000
        assert gray.std() > 0.05, f"{page.name} renders blank"
        # figures drawn below the header: many distinct grey levels, not only text
        assert len(np.unique(np.round(gray[300:], 2))) > 30


def test_missing_required_outputs(derivatives, tmp_path):
    settings, specs = derivatives
    missing = [SimpleNamespace(subject="003", task="pieman", run=1, space=MNI,
                               scan_id="sub-003_task-pieman_run-1")]
    with pytest.raises(AppError, match="networks.tsv"):
        reports.write_participant_reports(settings, missing)
    empty = Settings(bids_dir=tmp_path, output_dir=tmp_path / "empty",
                     analysis_level=["group"])
    with pytest.raises(AppError, match="group"):
        reports.write_group_report(empty)
    assert not (tmp_path / "empty" / "group.html").exists()


def test_atom_numbers_zero_or_one_based():
    one = tables.atom_numbers(pd.Series([1, 2, 3]), "x")
    zero = tables.atom_numbers(pd.Series([0, 1, 2]), "x")
    named = tables.atom_numbers(pd.Series(["atom01", "atom12"]), "x")
    assert one.tolist() == zero.tolist() == [1, 2, 3]
    assert named.tolist() == [1, 12]


def test_surface_on_bundled_mesh(tmp_path):
    """fsaverage5-sized data draws on nilearn's bundled mesh; other sizes fall back."""
    rng = np.random.default_rng(0)
    png = tmp_path / "surf.png"
    figures.draw_surface(rng.standard_normal(10242), rng.standard_normal(10242), png,
                          "signed", "test", threshold=1.0)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert figures.fsaverage_mesh(10242) is not None
    assert figures.fsaverage_mesh(123) is None


def test_page_embeds_the_style_sheet(tmp_path):
    """The page carries data/report.css itself (not the fallback), and nothing remote."""
    assert CSS_PATH.is_file()
    page = Page(tmp_path, tmp_path / "figures", "a <title>")
    page.open_section("s1", "Section 1")
    page.note("a note")
    page.close_section()
    page.prepend_summary("Title", [{"scan": "s1", "value": 0.5, "_anchor": "s1"}])
    html = page.write(tmp_path / "page.html").read_text()
    assert CSS_PATH.read_text() in html
    assert "<title>a &lt;title&gt;</title>" in html
    assert '<a href="#s1">s1</a>' in html and '<td class="num">0.5</td>' in html


def test_methods_errors_and_no_host_paths(derivatives, tmp_path):
    """Both reports carry the methods text (the run's parameters, references) and an
    errors section listing this run's crash files only; no absolute host path anywhere."""
    settings, specs = derivatives
    out = settings.output_dir
    log = out / "sub-001" / "log"
    log.mkdir(parents=True)
    (log / "crash-20260101-000000-u-encode_x-0000.txt").write_text(
        f"Node: encode_x\nTraceback:\n  File \"{tmp_path}/secret/x.py\"\nValueError: boom\n")
    (log / "old").mkdir()
    (log / "old" / "crash-20250101-000000-u-earlier-0000.txt").write_text("old\n")
    page = reports.write_participant_reports(settings, specs[:1])[0]
    group = reports.write_group_report(settings)
    sub = page.read_text()
    assert '<section id="errors">' in sub and "sub-001/log/crash-20260101" in sub
    assert "ValueError: boom" in sub and "earlier" not in sub
    assert '<section id="errors">' not in group.read_text()  # no crash in out/log
    for text in (sub, group.read_text()):
        assert '<section id="methods">' in text and "Dupre la Tour" in text
        assert f"{settings.n_null} circular time shifts" in text and "Nastase SA" in text
        assert str(tmp_path) not in text and str(out) not in text
        assert "<td>../bids</td>" in text  # settings shown relative to the derivatives


def test_positive_maps_drop_negatives_and_clip_the_ceiling_fraction(derivatives):
    """R2 below 0 is not drawn; the ceiling fraction is clipped to [0, 1] and says so."""
    values = np.array([-3.0, -0.1, 0.0, 0.2, 0.9, 52.0, np.nan])
    assert figures.positive_values(values).tolist() == [0, 0, 0, 0.2, 0.9, 52.0, 0]
    assert figures.positive_values(values, (0, 1)).tolist() == [0, 0, 0, 0.2, 0.9, 1.0, 0]
    assert figures.positive_threshold(values, (0, 1)) == (0.1, 1.0)
    settings, _ = derivatives
    g = settings.output_dir / "group"
    stem = f"task-pieman_space-{MNI}_model-smollm2"
    frac = 0.5 * _blob((3, 4, 5), 3)
    frac[0, 0, 0], frac[1, 1, 1], frac[2, 2, 2] = -2200.0, 52.0, 1.5
    _nifti(g / f"{stem}_stat-r2_desc-ceilingfraction_statmap.nii.gz", frac)
    text = reports.write_group_report(settings).read_text()
    assert "Clipped to [0, 1]: 2 values above 1, 1 below 0." in text
    assert "values &lt;= 0 are not drawn" in text and "Drawn: values &gt; 0.1 " in text


def test_colour_bar_ticks_do_not_crowd():
    """tidy_colorbar: 5 distinct, evenly spaced labels (no threshold ticks near 0)."""
    import nibabel as nib
    from nilearn import plotting

    plt = figures.pyplot()
    img = nib.Nifti1Image(np.clip(0.3 * _blob((5, 6, 5), 3), 0, None).astype(np.float32),
                          AFFINE)
    display = plotting.plot_glass_brain(img, threshold=0.03, vmax=0.3, colorbar=True,
                                        plot_abs=False, cmap="hot", symmetric_cbar=False)
    figures.tidy_colorbar(display, 0.0, 0.3)
    labels = [t.get_text() for t in display._cbar.ax.get_yticklabels()]
    ticks = display._cbar.get_ticks()
    plt.close("all")
    assert labels == ["0", "0.075", "0.15", "0.22", "0.3"]
    assert np.allclose(np.diff(ticks), 0.075)


def test_run_settings_show_each_nodes_time_and_peak_memory(derivatives, tmp_path):
    """The participant report's run-settings section lists the seconds and peak RSS the
    interfaces recorded for this participant's nodes and its stories' stimulus nodes,
    and not another participant's."""
    import dataclasses
    import json

    settings, specs = derivatives
    work = tmp_path / "work" / "bids_llm_encode_wf"
    task = specs[0].task
    for node, mb in ((f"extract_{task}_{task}_smollm2", 1400.4),
                     (f"label_sub_001_task_{task}_smollm2", 2939.0),
                     (f"label_sub_002_task_{task}_smollm2", 7777.0),
                     ("extract_otherstory_otherstory_smollm2", 8888.0)):
        (work / node).mkdir(parents=True)
        (work / node / "peak_rss.json").write_text(json.dumps(
            {"peak_rss_mb": mb, "children_peak_rss_mb": 12.0, "seconds": 3.25}))
    settings = dataclasses.replace(settings, work_dir=tmp_path / "work")
    text = reports.write_participant_reports(settings, specs[:1])[0].read_text()
    section = text[text.index('<section id="settings">'):]
    assert "Time and peak memory per node" in section
    assert "2939" in section and "1400" in section
    assert "7777" not in section and "8888" not in section
