#!/usr/bin/env python3
"""Pooled vs separate stimuli (docs/validation.md): how the installed bids_llm_encode
keys a task with two audio versions at the group level, and whether one story heard with
two audio onsets builds a participant graph.

    python scripts/stimulus_identity_check.py            # this checkout
    git archive HEAD bids_llm_encode | tar -x -C /tmp/old && \
        PYTHONPATH=/tmp/old python scripts/stimulus_identity_check.py   # a commit

Prints, for 4 fake participants (sub-001/002 heard version A, sub-003/004 version B, atoms
A = +1, B = -1): the group analyses found, the participants in each, and the atoms each
analysis' null would use; then the participant graph's stimulus branches for 2 participants
whose audio onsets differ by 2 s (or the error building it).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import bids_llm_encode
from bids_llm_encode import outputs
from bids_llm_encode.bids_inputs import ScanSpec
from bids_llm_encode.config import Settings
from bids_llm_encode.group import summary

SPACE = "MNI152NLin2009cAsym"


def fake_group_tree(out: Path) -> None:
    (out / "atoms").mkdir(parents=True)
    for audio, sign, subs in (("storya", 1.0, ("001", "002")), ("storyb", -1.0, ("003", "004"))):
        atoms = f"atoms/task-story_stim-{audio}_model-smollm2_atoms.tsv"
        pd.DataFrame({"onset": [0.0, 1.5], "atom01": [sign, -sign]}).to_csv(
            out / atoms, sep="\t", index=False)
        ident = {"Task": "story", "Stimulus": audio, "AudioFile": f"{audio}_audio.wav",
                 "Alignment": f"stimuli/gentle/{audio}/align.json", "RepetitionTime": 1.5,
                 "StoryTRs": [0, 50], "AudioOnset": 0.0}
        for sub in subs:
            func = out / f"sub-{sub}" / "func"
            func.mkdir(parents=True)
            stem = f"sub-{sub}_task-story_space-{SPACE}_model-smollm2_networks"
            if hasattr(outputs, "with_stim"):  # as each version's participant level names it
                stem = outputs.with_stim(stem, audio)
            (func / f"{stem}.tsv").write_text("atom\tatlas\tnetwork\n1\ts\tDMN\n")
            (func / f"{stem}.json").write_text(json.dumps(
                {"StimulusIdentity": ident, "AtomsFile": atoms}))


def spec(root: Path, sub: str, onset: float) -> ScanSpec:
    align = root / "stimuli" / "gentle" / "story" / "align.csv"
    align.parent.mkdir(parents=True, exist_ok=True)
    align.write_text("".join(f"w{i},w{i},{6.0 * i},{6.0 * i + 0.5}\n" for i in range(10)))
    bold = root / f"sub-{sub}_bold.nii.gz"
    bold.touch()
    events = pd.DataFrame({"onset": [onset], "duration": [60.0], "trial_type": ["story"],
                           "stim_file": ["story_audio.wav"]})
    words = pd.DataFrame({"word": [f"w{i}" for i in range(10)],
                          "onset": onset + 6.0 * np.arange(10),
                          "offset": onset + 6.0 * np.arange(10) + 0.5, "aligned": True})
    return ScanSpec(subject=sub, task="story", run=None, stimulus="story", condition=None,
                    space=SPACE, bold=[str(bold)], mask=None, tr=1.5, n_trs=100,
                    events=events, alignment=str(align), words=words)


def main() -> int:
    print(f"bids_llm_encode from {Path(bids_llm_encode.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        fake_group_tree(out)
        found = summary.collect_participant_outputs(out)
        print(f"group analyses: {len(found)}")
        for key, recs in sorted(found.items()):
            try:
                atoms = summary._read_atoms(out, "story", "smollm2", recs)
            except TypeError:  # before: (output_dir, task, model), the first file globbed
                atoms = summary._read_atoms(out, "story", "smollm2")
            print(f"  {key}: participants {sorted(r['sub'] for r in recs)}; null atoms "
                  f"atom01[0] = {atoms[0, 0]:+.0f}")
        from bids_llm_encode.workflows.base import init_bids_llm_encode_wf

        root = Path(tmp) / "bids"
        settings = Settings(bids_dir=root, output_dir=out, analysis_level=[],
                            work_dir=Path(tmp) / "work")
        try:
            wf = init_bids_llm_encode_wf(settings, [spec(root, "001", 0.0),
                                                    spec(root, "002", 2.0)])
            branches = sorted(n.name for n in wf._graph.nodes()
                              if n.name.startswith("extract_"))
            print(f"participant graph, onsets 0 s and 2 s: {len(branches)} stimulus "
                  f"branches {branches}")
        except Exception as err:  # noqa: BLE001 - the "before" figure is this error
            print(f"participant graph, onsets 0 s and 2 s: {type(err).__name__}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
