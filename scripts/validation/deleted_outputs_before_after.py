"""Delete one participant's outputs, rerun with the same -w, count what is missing.
'before' restores nipype's default caching of sinks/reports (the behaviour before #17)."""
import sys
import time
from pathlib import Path


def run(d: Path, mode: str):
    from bids_llm_encode.interfaces import derivatives, reports
    if mode == "before":
        for c in (derivatives.WriteStimulusOutputs, derivatives.WriteParticipantOutputs,
                  reports.ParticipantReport, reports.GroupReport):
            del c.always_run
    from bids_llm_encode.cli.run import main
    out = d / "out"
    written = sorted(p for p in out.rglob("*") if p.is_file() and "log" not in p.parts
                     and p.name != "dataset_description.json")
    for p in written:
        p.unlink()
    t = time.time()
    code = main([str(d / "ds"), str(out), "participant", "--participant-label", "001",
                 "-w", str(d / "work"), "--n-null", "100", "--nprocs", "2"])
    missing = [p for p in written if not p.exists()]
    print(mode, "exit", code, "deleted", len(written), "missing after rerun", len(missing),
          "rerun s %.0f" % (time.time() - t))


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2])
