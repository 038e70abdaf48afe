"""Held-out R2 of the atoms in the planted voxels vs the rest, per participant, from a run
of the simulator (ground_truth.json) and the app's derivatives.

    python scripts/planted_r2.py demo/bids demo/derivatives
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_llm_encode.networks import load_atlas


def planted_r2(bids: Path, out: Path) -> list[dict]:
    truth = json.loads((bids / "sourcedata" / "ground_truth.json").read_text())
    planted = {n["network"] for n in truth["networks"]}
    rows = []
    for sub in truth["participants"]:
        func = out / f"sub-{sub}" / "func"
        r2_path = next(func.glob("*_stat-r2_desc-atoms_statmap.nii.gz"))
        mask_img = nib.load(next(func.glob("*_desc-brain_mask.nii.gz")))
        mask = np.asarray(mask_img.dataobj) > 0
        r2 = np.asarray(nib.load(r2_path).dataobj)[mask]
        atlas = load_atlas(truth["atlas"], mask_img, mask_img)
        inside = np.isin(atlas.labels, [i for i, name in atlas.names.items() if name in planted])
        rows.append({"sub": sub, "planted": float(np.nanmean(r2[inside])),
                     "rest": float(np.nanmean(r2[~inside])), "n_planted": int(inside.sum())})
    return rows


if __name__ == "__main__":
    rows = planted_r2(Path(sys.argv[1]), Path(sys.argv[2]))
    for r in rows:
        print(f"sub-{r['sub']}: mean held-out R2 planted {r['planted']:.4f} "
              f"({r['n_planted']} voxels), rest {r['rest']:.4f}")
    print(f"mean over participants: planted {np.mean([r['planted'] for r in rows]):.4f}, "
          f"rest {np.mean([r['rest'] for r in rows]):.4f}")
