"""The ``local`` executor: a sweep's runs on this machine, several at a time, each a ``bench run`` process.

Worker slots are placed on devices: on the CPU every slot is ``cpu`` and each run gets an equal share of
the cores as torch threads (more threads than cores per run make every run slower); on GPUs the slots go
round the visible devices, ``per_device`` runs on each (one MAML run leaves a GPU mostly idle). Each run's
stdout and stderr go to ``<out>/logs/<run>.log``; its start and exit code go to the sweep record.

Ctrl-C, SIGTERM and SIGUSR2 to the sweep are forwarded once to every running run, which checkpoints at its
next iteration and exits; no further run starts, and the sweep then raises ``RunStopped`` (running the same
sweep again resumes them). The runs are started in their own sessions so that a Ctrl-C in the terminal
reaches them only through the sweep (a second Ctrl-C to a run interrupts it without a checkpoint).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmark.errors import EXIT_PAUSED, BenchError, RunStopped
from benchmark.harness.sweep.plan import bench_process
from benchmark.harness.sweep.record import now, set_jobs

LOG_DIR = "logs"
#: The signals a sweep forwards to its runs (what Ctrl-C, Slurm and kill send before stopping a job).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


@dataclass(frozen=True)
class Finished:
    """A run's process ended: its exit code and how long it took."""

    run: Any
    device: str
    exit_code: int
    seconds: float


def worker_devices(device: str, workers: int | None, per_device: int) -> list[str]:
    """The device of each worker slot.

    Args:
        device: ``auto`` (every visible GPU, else the CPU), ``cpu``, ``cuda`` (every visible GPU) or ``cuda:N``.
        workers: the number of slots (default: ``per_device`` per GPU, or 1 on the CPU).
        per_device: runs per GPU.

    Raises:
        BenchError: bad counts, or a CUDA device that is not there.
    """
    from benchmark.harness.runtime import resolve_device

    if per_device < 1:
        raise BenchError(f"--per-device must be at least 1 (got {per_device})")
    if workers is not None and workers < 1:
        raise BenchError(f"--workers must be at least 1 (got {workers})")
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        return ["cpu"] * (workers or 1)
    import torch

    # "cuda" and "auto" spread the runs over every GPU; "cuda:N" keeps them on that one (the resolved device
    # always has an index, so ask the name).
    gpus = [f"cuda:{resolved.index}"] if ":" in device else [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    slots = [gpu for _ in range(per_device) for gpu in gpus]  # round the devices: the first runs spread out
    if workers is None:
        return slots
    return [slots[i % len(slots)] for i in range(workers)]


class LocalPool:
    """Runs a sweep's runs on worker slots; ``run()`` reports each run's end through ``report``.

    Args:
        out: the sweep's folder.
        devices: one device per worker slot (``worker_devices``).
        time_limit: seconds for the whole sweep: each run gets what is left (``--time-limit``), none starts after.
        report: called in the main thread with each ``Finished``.
    """

    def __init__(self, out: Path, devices: Sequence[str], *, time_limit: float | None = None,
                 report: Callable[[Finished], None] = lambda finished: None) -> None:
        self.out, self.devices, self.report = Path(out), list(devices), report
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self._todo: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards _running and _stop_signal against a launch racing a stop
        self._running: dict[int, subprocess.Popen] = {}
        self._stop_signal: int | None = None
        self._timed_out = False
        self._error: BaseException | None = None

    def _env(self, device: str) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if device == "cpu" and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.devices)))
        return env

    def run(self, runs: Sequence[Any]) -> None:
        """Run every run (``SweepRun``s) to its end, or until a stop signal or the time limit.

        Raises:
            RunStopped: a signal or the time limit stopped the sweep (the runs checkpointed; resumable).
        """
        (self.out / LOG_DIR).mkdir(parents=True, exist_ok=True)
        for run in runs:
            self._todo.put(run)
        workers = [threading.Thread(target=self._work, args=(device,), daemon=True)
                   for device in self.devices[: max(1, min(len(self.devices), len(runs)))]]
        previous = self._install_handlers()
        try:
            for worker in workers:
                worker.start()
            self._drain(workers)
        finally:
            self._restore_handlers(previous)
        if self._error is not None:
            raise self._error
        if self._stop_signal is not None:
            name = signal.Signals(self._stop_signal).name
            raise RunStopped(f"the sweep was stopped by {name}: its running runs checkpointed; run the same "
                             "bench sweep again to resume them", 128 + self._stop_signal)
        if self._timed_out:
            raise RunStopped("the sweep's time limit was reached: its running runs checkpointed; run the same "
                             "bench sweep again to go on", EXIT_PAUSED)

    # -- main thread ------------------------------------------------------------------------------------------
    def _drain(self, workers: list[threading.Thread]) -> None:
        """Record starts and ends as the workers send them, until every worker is done. A short timeout keeps
        the main thread free to run signal handlers."""
        while any(w.is_alive() for w in workers) or not self._events.empty():
            try:
                kind, payload = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "error":
                self._error = self._error or payload
                self._on_signal(signal.SIGTERM, None)  # stop the other runs cleanly, then raise it
                continue
            if kind == "start":
                run, pid = payload
                set_jobs(self.out, {run.name: {"executor": "local", "log": f"{LOG_DIR}/{run.name}.log",
                                               "started": now(), "pid": pid, "host": socket.gethostname()}})
            else:
                finished: Finished = payload
                set_jobs(self.out, {finished.run.name: {"exit_code": finished.exit_code, "ended": now()}}, merge=True)
                self.report(finished)

    def _install_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}

    @staticmethod
    def _restore_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        with self._lock:
            if self._stop_signal is None:
                self._stop_signal = signum
            for proc in self._running.values():
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    # -- worker threads ---------------------------------------------------------------------------------------
    def _work(self, device: str) -> None:
        try:
            self._work_loop(device)
        except BaseException as exc:  # e.g. a log that cannot be opened: the main thread raises it
            self._events.put(("error", exc))

    def _work_loop(self, device: str) -> None:
        while True:
            try:
                run = self._todo.get_nowait()
            except queue.Empty:
                return
            started = time.monotonic()
            args = run.command(device)
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    self._timed_out = True
                    return
                args += ["--time-limit", f"{left:.0f}s" if left >= 1 else "1s"]
            with self._lock:
                if self._stop_signal is not None:
                    return
            log = open(self.out / LOG_DIR / f"{run.name}.log", "ab")
            try:
                log.write(f"=== {now()} on {device}: bench {subprocess.list2cmdline(args)}\n".encode())
                log.flush()
                with self._lock:  # checked again under the lock: a stop between the two checks starts nothing
                    if self._stop_signal is not None:
                        return
                    proc = subprocess.Popen(bench_process(args), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, env=self._env(device),
                                            start_new_session=True)
                    self._running[proc.pid] = proc
                self._events.put(("start", (run, proc.pid)))
                code = proc.wait()
            finally:
                log.close()
            with self._lock:
                self._running.pop(proc.pid, None)
            if code == EXIT_PAUSED and self.deadline is not None:
                self._timed_out = True
            self._events.put(("end", Finished(run, device, code, time.monotonic() - started)))
