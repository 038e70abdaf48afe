"""Issue 15's planted-layer check through the whole app: simulator -> participant -> group.

The simulator draws DefaultA's 64 ANs from layers 20-24 of the bundled SmolLM2 (the ANs
there that share the course most specific to those layers, ``--planted-layers 20:24``) and
Language's from every layer (the control: a course all layers carry alike). The group's layer table (``*_layers.tsv``) must find the
planted range: DefaultA's layer test significant, layers 20-24 over-represented in its AN
sub-group; Language's not significant and a larger p than DefaultA's. docs/validation.md
("Planted layers at app level, this round") has the same run over eight seeds and other
layer ranges.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.cli.run import main

pytestmark = pytest.mark.slow
LO, HI = 20, 24


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    from bids_llm_encode.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("layers")
    simulate_dataset(root / "bids", n_participants=3, resolution=8, snr=1.0,
                     planted=("DefaultA:+", "Language:-"), planted_layers=f"{LO}:{HI}",
                     seed=0, progress=False)
    common = ["-w", str(root / "work"), "--n-null", "300", "--nprocs", "2", "--no-reports"]
    for level in ("participant", "group"):
        assert main([str(root / "bids"), str(root / "out"), level, *common]) == 0
    table = pd.read_csv(next((root / "out" / "group").glob("*_model-smollm2_layers.tsv")),
                        sep="\t")
    truth = json.loads((root / "bids" / "sourcedata" / "ground_truth.json").read_text())
    return table, truth


def _network(table, name):
    rows = table[table["network"] == name].sort_values("layer")
    assert len(rows) == 30, f"{name}: expected one row per SmolLM2 layer, got {len(rows)}"
    return rows


def test_ground_truth_records_a_layer_specific_draw(layer_run):
    _, truth = layer_run
    net = truth["networks"][0]
    layers = {int(a[1:].split(".")[0]) for a in net["an_ids"]}
    assert net["network"] == "DefaultA" and layers <= set(range(LO, HI + 1))
    assert net["layer_specificity"]["r2_inside"] > net["layer_specificity"]["r2_outside"]
    assert truth["networks"][1]["layers"] is None


def test_planted_range_is_found_in_the_group_layer_table(layer_run):
    table, truth = layer_run
    planted = _network(table, "DefaultA")
    assert planted["p"].iloc[0] < 0.05, planted[["tvd", "p"]].iloc[0].to_dict()
    inside = planted["layer"].between(LO, HI)
    mass, mass_all = planted.loc[inside, "distribution"].sum(), \
        planted.loc[inside, "distribution_all"].sum()
    assert mass > mass_all + 0.01, (mass, mass_all)
    # the histogram follows where the planted course is carried: SmolLM2's residual stream
    # passes it on to layers 25-29 too, so the peak itself may lie there (docs/validation.md)
    profile = np.asarray(truth["networks"][0]["layer_profile"])
    r = np.corrcoef(planted["enrichment"].to_numpy(float), profile)[0, 1]
    assert r > 0.7, r
    # every participant labels DefaultA, so each has its own distribution and CI
    assert (planted["n_participants"] == 3).all()
    assert np.all(planted["ci_low"] <= planted["ci_high"])


def test_layer_neutral_control_is_not_significant(layer_run):
    """Language is the negative control: ANs from every layer whose course all layers carry
    alike. Its layer test is a null case (over eight seeds: p <= .05 in 1 of the 6 where it
    was labelled, docs/validation.md), and the planted range gives the smaller p."""
    table, truth = layer_run
    assert truth["networks"][1]["layer_evenness"]["cv"] > 0
    p_planted = _network(table, "DefaultA")["p"].iloc[0]
    p_control = _network(table, "Language")["p"].iloc[0]
    assert p_control > 0.05 and p_planted < p_control, (p_planted, p_control)
    # the permutation null's mean distribution and the enrichment against it are written
    assert np.isfinite(table[["distribution_null", "enrichment"]].to_numpy()).all()
