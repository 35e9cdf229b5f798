"""The ``slurm_cluster`` fixture: a real single-node Slurm cluster on this machine, for tests marked ``slurm``.

The cluster is started by ``scripts/slurm/start.sh`` (munged, mariadbd, slurmdbd, slurmctld, slurmd; state and logs
under ``BENCH_SLURM_DIR``, default ``/tmp/bench-slurm``) when it is not already up. The fixture never installs
packages (CI runs ``scripts/slurm/install.sh`` before pytest); it SKIPS, with the reason, when Slurm is not
installed, when the cluster is down and this is not root, or when start-up fails (with the tail of the logs).

A cluster this session started is stopped again at the end of the session (``scripts/slurm/stop.sh``), unless
``BENCH_SLURM_KEEP=1`` or another pytest session is still using it; a cluster that was already up is left alone.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"
START_TIMEOUT_S = 300


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to submit to the local cluster (``SLURM_CONF`` is already set in the environment)."""

    dir: Path
    conf: Path
    partition: str
    started_here: bool
    start_s: float


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(script: str, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
    # Daemons started by the script must not inherit pytest's pipes: the script redirects their output to logs.
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed (no sbatch/slurmctld): as root, run bash scripts/slurm/install.sh")
    slurm_dir = Path(os.environ.get("BENCH_SLURM_DIR", "/tmp/bench-slurm")).resolve()
    conf = slurm_dir / "etc" / "slurm.conf"
    env_before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # sbatch/sacct, called by submitit, find the cluster through it

    started_here = False
    t0 = time.monotonic()
    try:
        try:
            up = _run("start.sh", "--check", timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            up = False
        if not up:
            if os.geteuid() != 0:
                pytest.skip(
                    f"the local Slurm cluster ({slurm_dir}) is not up and starting it needs root: "
                    "sudo bash scripts/slurm/start.sh"
                )
            try:
                proc = _run("start.sh")
            except subprocess.TimeoutExpired as e:
                out = e.output.decode() if isinstance(e.output, bytes) else (e.output or "")
                pytest.skip(f"scripts/slurm/start.sh did not finish in {START_TIMEOUT_S} s:\n{_tail(out)}")
            if proc.returncode != 0:
                # Leave no half-started daemons behind (munged may serve another cluster: left alone).
                subprocess.run(["bash", str(SCRIPTS / "stop.sh")], env={**os.environ, "BENCH_SLURM_KEEP_MUNGE": "1"},
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=180)
                pytest.skip(f"the local Slurm cluster failed to start (scripts/slurm/start.sh exit {proc.returncode}):\n"
                            f"{_tail(proc.stdout)}")
            started_here = True
        start_s = time.monotonic() - t0

        # A shared lock for as long as this session uses the cluster, so another session's teardown
        # leaves it running.
        try:
            lock = open(slurm_dir / ".users.lock", "a+")
        except PermissionError:  # not root: start.sh made it readable, which is enough for flock
            lock = open(slurm_dir / ".users.lock")
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            yield SlurmCluster(
                dir=slurm_dir,
                conf=conf,
                partition=os.environ.get("BENCH_SLURM_PARTITION", "debug"),
                started_here=started_here,
                start_s=start_s,
            )
        finally:
            if started_here and os.environ.get("BENCH_SLURM_KEEP") != "1":
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only when no other session holds it
                except OSError:
                    pass
                else:
                    _run("stop.sh", timeout=180)
            lock.close()
    finally:
        if env_before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = env_before
