"""Build the bundled default atlas (kong2019 = NCT's AS400K17) from a toolbox cache.

    CBIG_NETWORK_CORRESPONDENCE_DATA_DIR=../shared/nct python scripts/make_default_atlas.py

Reads AS400K17 exactly as ``--fbn-atlas nct:AS400K17`` does (toolbox's parcel -> network
assignment, its cortical mask), and writes into bids_llm_encode/data/atlases/: the
network-level dseg (int16 NIfTI, FSL MNI 2 mm), its names TSV, a JSON sidecar (source,
licence, derivation), and the fsaverage6 label vectors (npz, lh/rh).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_llm_encode.networks.nct import NCT_VERSION, bundled_atlas_files, read_nct_atlas


def main() -> None:
    files = bundled_atlas_files()
    files["nii"].parent.mkdir(parents=True, exist_ok=True)
    vol = read_nct_atlas("AS400K17", "FSLMNI2mm")
    surf = read_nct_atlas("AS400K17", "fsaverage6")
    assert vol["names"] == surf["names"], "volume and surface names differ"
    img = nib.Nifti1Image(vol["labels"].astype(np.int16), vol["affine"])
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm")
    nib.save(img, files["nii"])
    lab = surf["labels"].astype(np.int16)
    np.savez_compressed(files["fsaverage6"], lh=lab[:40962], rh=lab[40962:])
    idx = sorted(vol["names"])
    pd.DataFrame({"index": idx, "name": [vol["names"][i] for i in idx]}).to_csv(
        files["tsv"], sep="\t", index=False)
    root = Path(vol["root"]) / "core"
    sources = vol["files"] + surf["files"] + ["network_assignment/AS400K17.mat",
                                              "network_names/AS400K17",
                                              "cortical_masks/FSLMNI2mm.nii.gz"]
    side = {
        "Name": "kong2019: Schaefer 2018 400 parcels x Kong 2019 17 networks (AS400K17)",
        "Source": "Network Correspondence Toolbox (Kong et al. 2024), atlas AS400K17, data "
                  "tag v1.1.0 of https://github.com/rubykong/cbig_network_correspondence_data",
        "SourceURL": "https://raw.githubusercontent.com/rubykong/"
                     "cbig_network_correspondence_data/v1.1.0/",
        "SourceFiles": {r: hashlib.sha256((root / r).read_bytes()).hexdigest()
                        for r in sources},
        "Toolbox": f"cbig-network-correspondence {NCT_VERSION} (PyPI), MIT licence",
        "Space": "FSL MNI152 2 mm (91 x 109 x 91; MNI152NLin6Asym); fsaverage6 vertices in "
                 "the .npz (lh, rh)",
        "Derivation": "parcel labels 1..400 mapped to networks 1..17 by the toolbox's "
                      "network_assignment/AS400K17.mat; volume voxels outside the toolbox's "
                      "cortical mask (cortical_masks/FSLMNI2mm.nii.gz) set to 0, as the "
                      "toolbox's read_atlas does; names from network_names/AS400K17 in label "
                      "order; stored as int16. Made by scripts/make_default_atlas.py.",
        "License": "Toolbox code: MIT. The Schaefer 2018 parcellations and the Kong 2019 "
                   "(MS-HBM) network labels are distributed by the CBIG lab "
                   "(github.com/ThomasYeoLab/CBIG) under that repository's MIT licence; the "
                   "data repository itself states no separate licence in the files cached "
                   "here. Cite the papers below when using it.",
        "References": [
            "Schaefer A, et al. (2018) Local-global parcellation of the human cerebral cortex "
            "from intrinsic functional connectivity MRI. Cereb Cortex 28:3095-3114.",
            "Kong R, et al. (2019) Spatial topography of individual-specific cortical "
            "networks predicts human cognition, personality, and emotion. Cereb Cortex "
            "29:2533-2551.",
            "Kong R, et al. A network correspondence toolbox for quantitative evaluation "
            "of novel neuroimaging results. bioRxiv 2024; Nature Communications 2025.",
        ],
    }
    files["json"].write_text(json.dumps(side, indent=2) + "\n")
    for f in files.values():
        print(f, f.stat().st_size)


if __name__ == "__main__":
    main()
