import sys

import bids_llm_encode.cli.workflow as w

if len(sys.argv) > 1 and sys.argv[1] == "before":
    w.rerun_if_outputs_missing = lambda wf, out: []
from bids_llm_encode.cli.run import main

if __name__ == "__main__":
    sys.exit(main(["ds", "out", "group", "-w", "work", "--n-null", "50", "--n-atoms", "8", "--nprocs", "2", "--no-reports"]))
