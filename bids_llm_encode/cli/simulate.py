"""``bids_llm_encode_simulate``: a Narratives-shaped dataset with planted ground truth."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import EXIT_OK, AppError
from ..simulate import DEFAULT_NOISE_FWHM_MM, DEFAULT_PLANTED, DEFAULT_SIM_ATLAS
from .parser import _Parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bids_llm_encode_simulate",
        description=(
            "Write a Narratives-shaped BIDS dataset (raw tree, derivatives/afni-nosmooth "
            "volumes on an MNI152NLin2009cAsym grid, brain mask, Gentle alignments, "
            "code/scan_exclude.json; with --space fsaverage6 also fsaverage6 GIFTIs) whose "
            "BOLD carries planted network signals built from the default model's artificial "
            "neurons; sourcedata/ground_truth.json records "
            "what was planted."
        ),
    )
    p.add_argument("out_dir", type=Path, help="new (or empty) folder to write the dataset into")
    p.add_argument("--task", default="pieman", help="task label (default: %(default)s)")
    p.add_argument("--participants", type=int, default=3,
                   help="number of participants (default: %(default)s)")
    p.add_argument(
        "--planted", default=",".join(DEFAULT_PLANTED),
        help="comma list NETWORK:+|- of networks of --atlas that carry a signal, with its "
        "sign (default: %(default)s)",
    )
    p.add_argument(
        "--atlas", default=DEFAULT_SIM_ATLAS,
        help="atlas whose networks are planted: kong2019 (bundled Schaefer 400 x Kong 17 "
        "networks: large irregular parcels, e.g. DefaultA, Language, Auditory), seitzman2018 "
        "(spheres, e.g. DefaultMode, Auditory), or any --fbn-atlas of the app "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--global", dest="global_amp", type=float, default=0.0, metavar="AMP",
        help="add another AN sub-group's response to every brain voxel, at AMP noise "
        "standard deviations (0 = none; default: %(default)s)",
    )
    p.add_argument(
        "--noise-fwhm", type=float, default=DEFAULT_NOISE_FWHM_MM, metavar="MM",
        help="spatial smoothness of the noise: FWHM in mm of the Gaussian applied to each "
        "TR's white-noise volume (default: %(default)s)",
    )
    p.add_argument(
        "--planted-layers", metavar="LO:HI", default=None,
        help="draw the first --planted network's ANs from the model's layers LO..HI "
        "(inclusive, 0-based) only: the ANs there that share the time course most specific "
        "to those layers (top contrastive principal component against the other layers); "
        "the other networks are the negative control, ANs from every layer whose course all "
        "layers carry alike (default: every network's ANs drawn at random from all layers)",
    )
    p.add_argument("--snr", type=float, default=1.0,
                   help="signal-to-noise variance ratio in planted voxels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--alignment", type=Path,
        help="a Gentle align.csv/align.json to use as the story (default: the shipped story "
        "with synthetic word timings)",
    )
    p.add_argument("--model", default="smollm2",
                   help="model whose neurons make the signal (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=4,
                   help="voxel size in mm of the simulated grid (default: %(default)s)")
    p.add_argument(
        "--space", default="MNI152NLin2009cAsym", choices=["MNI152NLin2009cAsym", "fsaverage6"],
        help="fsaverage6: also write Narratives' surface files (..._space-fsaverage6_hemi-"
        "{L,R}_desc-clean.func.gii, 40,962 vertices each, medial wall NaN) with the same "
        "planted networks (bundled kong2019 labels; white noise, AR(1) in time), for "
        "`bids_llm_encode ... --space fsaverage6` (default: %(default)s: volumes only)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from ..simulate import simulate_dataset

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        truth = simulate_dataset(
            args.out_dir,
            task=args.task,
            n_participants=args.participants,
            planted=[x for x in args.planted.split(",") if x.strip()],
            snr=args.snr,
            seed=args.seed,
            alignment=args.alignment,
            model=args.model,
            resolution=args.resolution,
            atlas=args.atlas,
            global_amp=args.global_amp,
            noise_fwhm=args.noise_fwhm,
            planted_layers=args.planted_layers,
            space=args.space,
        )
    except AppError as err:
        print(f"bids_llm_encode_simulate: error: {err}", file=sys.stderr)
        code = err.exit_code
    else:
        nets = ", ".join(f"{n['network']}{'+' if n['sign'] > 0 else '-'}" for n in truth["networks"])
        print(f"wrote {args.out_dir}: {len(truth['participants'])} participants, task "
              f"{truth['task']}, {truth['n_trs']} TRs, planted {nets}")
        code = EXIT_OK
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
