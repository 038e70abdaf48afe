"""Scaling out for real: a single-node SLURM cluster started on this machine runs two
participants as an array job (the docs/hpc.md recipe), then the group level succeeds.

Needs Debian's slurm-wlm and munge (scripts/install.sh installs them when it runs as root);
skipped, with the reason, where they cannot be had.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _have_slurm() -> str | None:
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(b)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install "
                       "-y -qq slurm-wlm munge", shell=True, capture_output=True, timeout=600)
        missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(b)]
    if missing:
        return f"SLURM not installable here (missing {', '.join(missing)})"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _have_slurm()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=test
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPort=16817
SlurmdPort=16818
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/spool
StateSaveLocation={root}/state
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmUser=root
SlurmdUser=root
MpiDefault=none
NodeName={host} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    (root / "spool").mkdir()
    (root / "state").mkdir()
    env = dict(os.environ, SLURM_CONF=str(conf))
    # munge: a key and a running daemon (left running if it already was)
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["mungekey", "-c"], capture_output=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        subprocess.run(["munged", "--force"], capture_output=True)
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    for _ in range(60):
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                             text=True)
        if out.stdout.strip() in ("idle", "mix"):
            break
        time.sleep(1)
    else:
        pytest.fail(f"SLURM did not come up: {(root / 'slurmctld.log').read_text()[-2000:]}")
    yield env
    for pidfile in ("slurmd.pid", "slurmctld.pid"):
        try:
            os.kill(int((root / pidfile).read_text()), 15)
        except (OSError, ValueError):
            pass


def test_array_job_over_participants_then_group(slurm, tmp_path):
    from bids_llm_encode.cli.run import main
    from bids_llm_encode.simulate import simulate_dataset

    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    simulate_dataset(bids, n_participants=2, resolution=8, progress=False)
    script = tmp_path / "array.sh"
    # the docs/hpc.md recipe: one participant per array task, read from participants.tsv
    script.write_text(f"""#!/bin/bash
#SBATCH --array=1-2
#SBATCH --cpus-per-task=1
#SBATCH --output={tmp_path}/job-%a.out
set -euo pipefail
sub=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {bids}/participants.tsv | cut -f1)
{sys.executable} -m bids_llm_encode.cli.run {bids} {out} participant \\
    --participant-label "$sub" -w {work}/"$sub" --n-null 100 --nprocs 1 --no-reports
echo "EXIT=$?"
""")
    sub = subprocess.run(["sbatch", "--parsable", str(script)], env=slurm, capture_output=True,
                         text=True)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    deadline = time.time() + 900
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job], env=slurm, capture_output=True,
                           text=True)
        if not q.stdout.strip():
            break
        time.sleep(3)
    logs = [(tmp_path / f"job-{i}.out") for i in (1, 2)]
    for log in logs:
        assert log.exists() and "EXIT=0" in log.read_text(), log.read_text()[-3000:]
    for s in ("001", "002"):
        assert (out / f"sub-{s}" / "func" /
                f"sub-{s}_task-pieman_space-MNI152NLin2009cAsym_model-smollm2_networks.tsv"
                ).exists()
    assert main([str(bids), str(out), "group", "-w", str(work / "group"), "--n-null", "100",
                 "--no-reports"]) == 0
    assert (out / "group" /
            "task-pieman_space-MNI152NLin2009cAsym_model-smollm2_networks.tsv").exists()


def test_slurmgraph_plugin_through_use_plugin(slurm, tmp_path):
    """--use-plugin: nipype submits the graph's nodes as dependent SLURM jobs."""
    from bids_llm_encode.cli.run import main
    from bids_llm_encode.simulate import simulate_dataset

    bids, out = tmp_path / "bids", tmp_path / "out"
    simulate_dataset(bids, n_participants=1, resolution=8, progress=False)
    plugin = tmp_path / "slurm.yml"
    plugin.write_text("plugin: SLURMGraph\nplugin_args:\n  dont_resubmit_completed_jobs: true\n"
                      "  sbatch_args: '--cpus-per-task=1'\n")
    os.environ["SLURM_CONF"] = slurm["SLURM_CONF"]
    try:
        code = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"),
                     "--use-plugin", str(plugin), "--n-null", "100"])
    finally:
        os.environ.pop("SLURM_CONF", None)
    assert code == 0  # submitted: SLURMGraph returns once the dependent jobs are queued
    deadline = time.time() + 600
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h"], env=slurm, capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(3)
    assert (out / "sub-001" / "func" /
            "sub-001_task-pieman_space-MNI152NLin2009cAsym_model-smollm2_networks.tsv").exists()
    assert (out / "sub-001.html").exists()  # the report node ran as a SLURM job too
