"""What one task of a sweep's Slurm job array runs: ``bench run`` as a child process, requeued on warning.

How submitit and Slurm stop a job (read in submitit 1.5's ``core/job_environment.py`` and ``slurm/slurm.py``):
the array is submitted with ``#SBATCH --signal=USR2@<delay>``, so Slurm sends SIGUSR2 to the processes of
the job step ``<delay>`` seconds before the time limit (and a preemption sends it too, where the cluster
is set up that way). submitit's job process installs a SIGUSR2 handler; it calls the callable's
``checkpoint()``, pickles the ``DelayedSubmission`` that returns in place of the job's pickle, runs
``scontrol requeue <job>`` and exits. It ignores SIGTERM (only logs it). The requeued task starts the
pickled callable again, in a new process. A signal counts against ``max_num_timeout`` when the job has run
for at least min(80% of its time limit, the limit less 10 minutes), i.e. always under a 50-minute limit;
otherwise it is taken for a preemption and does not count.

Why a child process rather than calling the runner in the job's process: the runner already turns
SIGUSR2 and SIGTERM into a checkpoint at the next iteration boundary (``RunStopped``, exit 140/143) and
resumes from it, and it needs its own handlers for that, which submitit's would replace in one process.
With a child, ``checkpoint()`` forwards SIGUSR2 to it, waits until it has checkpointed and exited, and
returns a fresh ``SweepJob`` (no process inside) to requeue; the requeued job runs the same command, which
resumes the run. Slurm's ``--signal`` (and ``scancel --signal``) goes to the processes of the job step, so
the child usually has it already: the forwarded copy covers a cluster that signals only the step's first
process, and a repeat is harmless (the runner stops once). A child that stops on its own (SIGTERM of a
preemption or cancellation, without the warning) ends the job as failed with "resumable" in its message:
run the sweep again to resubmit it. The child inherits the job's stdout and stderr, so its messages are in
the job's log; its last stderr lines also go into the job's error, which ``bench sweep --status`` shows.

This module is imported in the job's interpreter: stdlib and submitit only (torch loads in the child).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import submitit

from benchmark.errors import EXIT_PAUSED
from benchmark.harness.sweep.plan import bench_process

#: Exit codes of a ``bench run`` that checkpointed and stopped (time limit, Ctrl-C, SIGTERM, SIGUSR2).
STOPPED = {EXIT_PAUSED, 128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGUSR2}
#: ``bench run`` exits 2 for bad input or a fault: running it again would fail again.
EXIT_ERROR = 2


class RunFailed(RuntimeError):
    """The run's process failed; the message ends with its last lines on stderr."""


class SweepJob(submitit.helpers.Checkpointable):
    """One run of a sweep as a checkpointable submitit callable.

    Args:
        args: ``bench`` arguments of the run (``run --learner ... --out ... --name ...``).
        run_dir: the run directory (for the result).
        threads: torch's CPU threads in the child (the task's CPUs), unless OMP_NUM_THREADS is set.
        stop_grace_s: how long ``checkpoint()`` waits for the child to stop before killing it (its last
            periodic checkpoint is then where the run resumes).
    """

    def __init__(self, args: list[str], run_dir: str, threads: int = 1, stop_grace_s: float = 60.0) -> None:
        self.args, self.run_dir, self.threads, self.stop_grace_s = list(args), run_dir, threads, stop_grace_s
        self._proc: subprocess.Popen | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=5)

    def __getstate__(self) -> dict[str, Any]:
        # The process and the pump thread's buffer belong to this job's life only; a requeued job starts afresh.
        return {"args": self.args, "run_dir": self.run_dir, "threads": self.threads, "stop_grace_s": self.stop_grace_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __call__(self) -> dict[str, Any]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        self._proc = subprocess.Popen(bench_process(self.args), env=env,
                                      stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        pump = threading.Thread(target=self._pump, args=(self._proc.stderr,), daemon=True)
        pump.start()
        code = self._proc.wait()
        pump.join(timeout=5)
        if code == 0:
            return {"run_dir": self.run_dir, "exit_code": 0}
        if code in STOPPED:
            raise RunFailed(f"bench run stopped without the submitit warning (exit {code}), e.g. preempted or "
                            f"cancelled; its checkpoint is resumable: run the same bench sweep again{self._last()}")
        raise RunFailed(f"bench run exited with code {code}{self._last()}")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's SIGUSR2 handler: stop the child at its next iteration (it checkpoints), wait for
        it, and hand submitit a fresh copy of this job to requeue."""
        proc = self._proc
        if proc is not None:
            code = _stop(proc.pid, self.stop_grace_s)
            if code == EXIT_ERROR:
                raise RunFailed(f"bench run failed while stopping (exit {code}){self._last()}")
        return submitit.helpers.DelayedSubmission(SweepJob(self.args, self.run_dir, self.threads, self.stop_grace_s))

    def _pump(self, stream: Any) -> None:
        """Copy the child's stderr to the job's, keeping its last lines for the error message."""
        for raw in iter(stream.readline, b""):
            sys.stderr.buffer.write(raw)
            sys.stderr.flush()
            line = raw.decode(errors="replace").strip()
            if line:
                self._tail.append(line)

    def _last(self) -> str:
        return (": " + " | ".join(self._tail)) if self._tail else ""


def _stop(pid: int, grace_s: float) -> int | None:
    """SIGUSR2 to ``pid``, then wait up to ``grace_s`` for it to exit (SIGKILL after that); its exit code, or
    None when another waiter reaped it first.

    Waits with ``os.waitpid`` rather than ``Popen.wait``: this runs inside a signal handler that may have
    interrupted ``Popen.wait`` in ``__call__``, which holds a lock that a second ``Popen.wait`` would wait on
    for ever.
    """
    try:
        os.kill(pid, signal.SIGUSR2)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
