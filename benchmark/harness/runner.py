"""Train a learner, validate it periodically, evaluate it on the fixed test manifest, write its results.

A run is a directory (``rundir.py``). The runner locks it, checks the learner on the run's shapes
(``preflight.py``), trains with a checkpoint every ``checkpoint_every`` iterations, and stops cleanly at an
iteration boundary on Ctrl-C, SIGTERM or SIGUSR2 (what Slurm sends before a time limit or preemption) or
when ``time_limit`` runs out: it checkpoints and raises ``RunStopped``. Re-running the same plan resumes
from the last checkpoint; on the CPU a resumed run ends with the same per-episode results as an
uninterrupted one, because every random stream (episode samplers, learner) lives in the checkpoint.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch

from benchmark.errors import EXIT_PAUSED, BenchError, PluginError, RunStopped
from benchmark.harness import rundir as R
from benchmark.harness.plan import RunPlan, Session
from benchmark.harness.protocol import ClassPool, EpisodeSpec, Manifest, draw, make_sampler
from benchmark.learner import AdaptationSteps, Episodes, Learner, Minibatches, RunContext

#: Validation episodes are drawn with this seed, whatever the training seed, so curves are comparable.
VALIDATION_SEED = 0
#: A run on the CPU that will take longer than this gets a note on how long and how to shorten it.
LONG_RUN_SECONDS = 600


@dataclass
class RunOutcome:
    path: Any
    summary: dict[str, Any]
    resumed_from: int = 0
    skipped: bool = False
    #: For a skipped run: the plugin code it was made with differs from the code installed now.
    code_changed: bool = False


@dataclass
class TrainState:
    """Where training stands: what a checkpoint holds besides the learner and the samplers."""

    iteration: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    val_seconds: float = 0.0
    last_val: float | None = None
    #: The best validation results so far, best first: [validation accuracy, iteration, file slot].
    best: list[list[float | int]] = field(default_factory=list)
    #: Metrics accumulated since the last log row (kept across a stop so the log matches an unbroken run).
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    window: int = 0
    #: One record per session that trained this run (a resumed run has several): the iteration it started at
    #: and its device and versions (``SESSION_KEYS``), so a result made in pieces says what made each piece.
    sessions: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "log": self.log, "train_seconds": self.train_seconds,
                "val_seconds": self.val_seconds, "last_val": self.last_val, "best": self.best,
                "pending": {"sums": self.sums, "window": self.window}, "sessions": self.sessions}

    @staticmethod
    def from_dict(ckpt: dict[str, Any]) -> TrainState:
        pending = ckpt.get("pending", {})
        return TrainState(ckpt["iteration"], ckpt["log"], ckpt["train_seconds"], ckpt.get("val_seconds", 0.0),
                          ckpt.get("last_val"), ckpt.get("best", []),
                          pending.get("sums", {}), pending.get("window", 0), ckpt.get("sessions", []))


def _plain(value: Any) -> Any:
    """A str subclass (``torch.__version__`` is a TorchVersion) as a plain str: checkpoints load with
    ``weights_only=True``, which refuses unknown classes."""
    return str(value) if isinstance(value, str) else value


def _record_session(train: TrainState, environment: dict[str, Any]) -> None:
    """Add this session to ``train.sessions``. A session that trained nothing (stopped before its first
    iteration) is replaced by the next; a checkpoint from before sessions were recorded gets a first entry
    that says so."""
    if train.iteration > 0 and not train.sessions:
        train.sessions.append({"from_iteration": 0, "note": "earlier sessions not recorded"})
    if train.sessions and train.sessions[-1]["from_iteration"] == train.iteration:
        train.sessions.pop()
    train.sessions.append({"from_iteration": train.iteration,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **environment})


#: What each session of a run records (from ``provenance.environment``).
SESSION_KEYS = ("device", "device_name", "torch_version", "cuda_version", "metabench_version", "git_commit",
                "tf32_convolutions", "tf32_matmul")


def run_context(plan: RunPlan, session: Session) -> RunContext:
    s = plan.settings
    train_way, train_shot, train_query = s.train_shape
    return RunContext(way=s.way, shot=s.shot, query=s.query, device=session.device, seed=plan.seed,
                      num_train_classes=session.pools.train.num_classes, iterations=s.iterations,
                      train_way=train_way, train_shot=train_shot, train_query=train_query)


def build_learner(plan: RunPlan, session: Session) -> Learner:
    """The plan's learner on the session's device; a constructor that rejects its config is a clear error."""
    return plan.learner_cls(plan.config, run_context(plan, session))


def _predicted(learner: Learner, manifest: Manifest, pool: ClassPool, batch_size: int):
    """(logits [T, N*Q, N], query labels [T, N*Q]) for each batch of ``manifest``'s episodes, shape-checked."""
    spec = manifest.spec
    for _, batch in manifest.batches(pool, max(1, batch_size)):
        logits = learner.predict(batch.support_x, batch.support_y, batch.query_x)
        want = (batch.num_tasks, spec.way * spec.query, spec.way)
        if tuple(logits.shape) != want:
            raise PluginError(
                f"learner {learner.name!r} returned logits of shape {list(logits.shape)} from predict, "
                f"expected {list(want)} ([tasks, way*query, way])"
            )
        yield logits.detach(), batch.query_y


def evaluate(learner: Learner, manifest: Manifest, pool: ClassPool, batch_size: int) -> torch.Tensor:
    """Score ``learner`` on every episode of ``manifest``.

    Returns:
        accuracies [E] float64 on the CPU: the fraction of query images classified correctly per episode.
    """
    per_batch = [(logits.argmax(-1) == labels).to(torch.float64).mean(1)
                 for logits, labels in _predicted(learner, manifest, pool, batch_size)]
    return torch.cat(per_batch).cpu()  # one host synchronization for the whole evaluation


def evaluate_by_step(learner: Learner, manifest: Manifest, pool: ClassPool, batch_size: int) -> torch.Tensor:
    """Per-episode accuracy after each adaptation step, for learners with ``predict_steps``.

    Returns:
        [S+1, E] float64 on the CPU; the last row is exactly what ``evaluate`` gives.
    """
    spec, per_batch = manifest.spec, []
    for _, batch in manifest.batches(pool, max(1, batch_size)):
        logits = learner.predict_steps(batch.support_x, batch.support_y, batch.query_x)  # [S+1, T, N*Q, N]
        want = (batch.num_tasks, spec.way * spec.query, spec.way)
        if logits.dim() != 4 or tuple(logits.shape[1:]) != want:
            raise PluginError(f"learner {learner.name!r} returned logits of shape {list(logits.shape)} from "
                              f"predict_steps, expected [steps+1, {', '.join(map(str, want))}]")
        per_batch.append((logits.argmax(-1) == batch.query_y).to(torch.float64).mean(-1))
    return torch.cat(per_batch, dim=1).cpu()


def manifest_logits(learner: Learner, manifest: Manifest, pool: ClassPool, batch_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [E, N*Q, N] (float64) and query labels [E, N*Q] of every episode of ``manifest``, on the pool's
    device."""
    pairs = list(_predicted(learner, manifest, pool, batch_size))
    return torch.cat([logits.to(torch.float64) for logits, _ in pairs]), torch.cat([y for _, y in pairs])


def _read_metrics(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Average the accumulated metrics: the only place training synchronizes with the device."""
    if not sums:
        return {}
    keys = sorted(sums)
    values = torch.stack([sums[k].detach().to(torch.float64).cpu() for k in keys]).tolist()
    return {k: v / count for k, v in zip(keys, values)}


class Runner:
    """Runs one plan into its run directory.

    Args:
        plan: the resolved run.
        session: the device and class pools.
        learner: the plan's learner if it was already built (e.g. by the preflight of the first seed).
        progress: called with events ``start``, ``step``, ``log``, ``note`` and ``done`` (the CLI draws a bar).
        time_limit: seconds after which training checkpoints and stops (``RunStopped``, ``EXIT_PAUSED``).
        environment: versions and device, collected once per command.
    """

    def __init__(self, plan: RunPlan, session: Session, *, learner: Learner | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None, time_limit: float | None = None,
                 environment: dict[str, Any] | None = None) -> None:
        self.plan, self.session, self._learner = plan, session, learner
        self.dir = R.RunDirectory(plan.run_dir)
        self.progress = _ProgressRecorder(self.dir, progress or (lambda event: None))
        self.time_limit = time_limit
        self._environment = environment
        self._started = time.monotonic()
        self._by_step: torch.Tensor | None = None

    @cached_property
    def environment(self) -> dict[str, Any]:
        from benchmark.harness.provenance import environment

        return self._environment if self._environment is not None else environment(self.session.device)

    # -- the run directory ----------------------------------------------------------------------------------
    def inspect(self) -> str:
        """"new", "resume" or "done"; refuses a directory that holds a run of another plan."""
        if self.dir.path.exists() and not self.dir.path.is_dir():
            raise BenchError(f"{self.dir.path} exists and is not a folder; remove it or pass another --out/--name")
        recorded = self.dir.recorded_identity()
        if recorded is None:
            return "new"
        import json

        identity = json.loads(json.dumps(self.plan.identity()))  # tuples -> lists, as recorded
        if recorded != identity:
            diff = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
            raise BenchError(
                f"{self.dir.path} holds a run with a different config (differs in: {', '.join(diff)}); "
                "use another --out or --name, or --force to replace it"
            )
        return "done" if self.dir.is_finished() else "resume"

    def _config_record(self, learner: Learner, test: Manifest, val: Manifest) -> dict[str, Any]:
        plan = self.plan
        return {
            "run": plan.identity(),
            "config_hash": plan.config_hash,
            "describe": learner.describe(),
            "implementation": learner.implementation(),
            "plugin": dict(plan.provenance),
            "protocol": self.session.pools.test.protocol.as_dict(),
            "manifest_hash": test.hash,
            "validation_manifest_hash": val.hash,
            "preset_notes": plan.notes,
            "logging": {"log_every": plan.settings.log_every, "checkpoint_every": plan.settings.checkpoint_every},
            **self.environment,
            "command": plan.command,
        }

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, force: bool = False, *, wait_for_lock: float = 0.0) -> RunOutcome:
        """Run (or resume, or skip) the plan. Nothing is written before the learner passed its preflight.

        Args:
            force: replace a finished or started run of the same plan.
            wait_for_lock: seconds to wait for another process working on the same run (then refuse).
        """
        if not force and self.inspect() == "done":
            return self._skipped()
        learner, phases = self.prepare()
        R.check_writable(self.dir.path.parent)
        with self.dir.lock(wait_for_lock):
            if force:
                self.dir.clear()
            state = self.inspect()  # another process may have finished it while we waited
            if state == "done":
                return self._skipped()
            self.dir.remove_stale_temporaries()
            return self._run(state, learner, phases)

    def prepare(self) -> tuple[Learner, list[Episodes | Minibatches]]:
        """Build the learner and check it on the run's shapes (``preflight``); writes nothing."""
        from benchmark.harness.preflight import check_memory, check_phases, preflight
        from benchmark.harness.runtime import available_memory_bytes

        learner = self._learner or build_learner(self.plan, self.session)
        self._learner = None  # a repeated run builds its own
        phases = check_phases(learner, self.plan.settings.iterations)
        estimate = preflight(self.plan.learner_cls, self.plan.config, learner.context, learner, self.session.pools,
                             phases, learner.eval_batch_size)
        check_memory(estimate, available_memory_bytes(self.session.device), self.session.device)
        return learner, phases

    def _skipped(self) -> RunOutcome:
        summary = R.read_json(self.dir / R.SUMMARY)
        return RunOutcome(self.dir.path, summary, skipped=True, code_changed=self._code_change() is not None)

    def _code_change(self) -> tuple[str, str] | None:
        """(recorded, current) hash of the learner's code when the run directory was made with other code."""
        recorded = (R.read_json(self.dir / R.CONFIG).get("plugin") or {}).get("code_sha256")
        now = self.plan.provenance.get("code_sha256")
        return (recorded, now) if recorded and now and recorded != now else None

    def _run(self, state: str, learner: Learner, phases: list[Episodes | Minibatches]) -> RunOutcome:
        plan, pools = self.plan, self.session.pools
        test_spec = EpisodeSpec(plan.settings.way, plan.settings.shot, plan.settings.query)
        train_spec = EpisodeSpec(*plan.settings.train_shape)
        test_manifest = Manifest.build(pools.test, test_spec, plan.settings.episode_seed, plan.settings.episodes)
        val_manifest = Manifest.build(pools.val, test_spec, VALIDATION_SEED, plan.settings.val_episodes)
        samplers = [make_sampler(p, pools.train, train_spec, plan.seed, i) for i, p in enumerate(phases)]

        train = TrainState()
        if state == "resume" and self.dir.has_checkpoint():
            train = self._resume(learner, samplers)
        else:
            self.dir.write_config(self._config_record(learner, test_manifest, val_manifest))
            self.dir.write_manifest(test_manifest.to_json(pools.test))
        resumed_from = train.iteration
        _record_session(train, {key: _plain(self.environment.get(key)) for key in SESSION_KEYS})
        self.progress({"event": "start", "iteration": train.iteration, "total": plan.settings.iterations,
                       "dir": self.dir.path})

        with _StopOnSignal() as stop:
            self._train(learner, phases, samplers, val_manifest, train, stop)
            if stop.reason is not None:
                self._checkpoint(learner, samplers, train)
                self.progress({"event": "stopped", "iteration": train.iteration, "reason": stop.reason})
                raise RunStopped(
                    f"{stop.reason} at iteration {train.iteration} of {plan.settings.iterations}: checkpointed in "
                    f"{self.dir.path}; run the same command again to resume", stop.exit_code)
            t0 = time.perf_counter()
            self.progress({"event": "evaluate", "iteration": train.iteration, "total": plan.settings.iterations})
            stop.immediate = True  # evaluation has no boundary to stop at: a signal ends it at once
            try:
                accuracies, selected = self._select_and_evaluate(learner, train, test_manifest)
            except _Interrupted as exc:
                raise RunStopped(f"{exc.reason} during the final evaluation: training is complete and checkpointed "
                                 f"in {self.dir.path}; run the same command again to evaluate", exc.exit_code) from None
            eval_seconds = time.perf_counter() - t0
        summary = R.json_safe(self._summary(accuracies, train, eval_seconds, test_manifest, selected))
        if self._by_step is not None:
            summary["accuracy_by_step"] = self._by_step.mean(dim=1).tolist()
            self.dir.write_steps(self._by_step.tolist())
        self.dir.write_results(accuracies.tolist(), summary)
        self.progress({"event": "done", "summary": summary})
        return RunOutcome(self.dir.path, summary, resumed_from=resumed_from)

    def _resume(self, learner: Learner, samplers: list[Any]) -> TrainState:
        self._refuse_changed_code()
        ckpt = self.dir.load_state(R.CHECKPOINT, self.session.device)
        path = self.dir / R.CHECKPOINT
        if ckpt.get("device_type", self.session.device.type) != self.session.device.type:
            raise BenchError(
                f"{self.dir.path} was started on {ckpt['device_type']} and cannot resume on "
                f"{self.session.device.type} (its episode stream is device-specific); pass --device "
                f"{ckpt['device_type']}, or --force to restart"
            )
        try:
            learner.load_state_dict(ckpt["learner"])
            for sampler, sampler_state in zip(samplers, ckpt["samplers"], strict=True):
                sampler.load_state_dict({"generator": sampler_state["generator"].cpu()})
            return TrainState.from_dict(ckpt)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise R.RunDirError(f"{path} does not fit this run ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): "
                                "use --force to start the run again") from None

    def _refuse_changed_code(self) -> None:
        """A run resumed with other learner code would be one result from two algorithms."""
        change = self._code_change()
        if change is not None:
            recorded, now = change
            raise BenchError(
                f"{self.dir.path} was started with other code of learner {self.plan.learner!r} (code sha256 "
                f"{recorded[:12]}, now {now[:12]}); resuming would make one result of two versions: check out the "
                "code it started with, or pass --force to start it again")

    def _phase_at(self, phases: list[Episodes | Minibatches], iteration: int) -> int:
        """The index of the phase that iteration ``iteration`` (0-based) belongs to."""
        end = 0
        for index, phase in enumerate(phases):
            if phase.iterations is None:
                return index
            end += phase.iterations
            if iteration < end:
                return index
        return len(phases) - 1

    def _train(self, learner: Learner, phases: list[Any], samplers: list[Any], val_manifest: Manifest,
               train: TrainState, stop: _StopOnSignal) -> None:
        settings = self.plan.settings
        total = settings.iterations
        window_start = time.perf_counter()
        session_start, session_first = time.perf_counter(), train.iteration
        while train.iteration < total:
            if stop.reason is None and self._out_of_time():
                stop.request("time limit reached", EXIT_PAUSED)
            if stop.reason is not None:
                train.train_seconds += time.perf_counter() - window_start
                return
            index = self._phase_at(phases, train.iteration)
            metrics = learner.meta_train_step(draw(samplers[index], phases[index]))
            for k, v in metrics.items():  # accumulate on the device: no synchronization here
                v = torch.as_tensor(v, device=self.session.device).detach()
                train.sums[k] = train.sums[k] + v if k in train.sums else v.clone()
            train.iteration += 1
            train.window += 1
            it = train.iteration
            self.progress({"event": "step", "iteration": it, "total": total})
            if it - session_first == 5:
                self._note_duration(time.perf_counter() - session_start, 5, total - it)
            if not (it % settings.log_every == 0 or it == total or it % settings.val_every == 0
                    or it % settings.checkpoint_every == 0):
                continue
            row = {"iteration": it, **_read_metrics(train.sums, train.window)}  # synchronizes the device
            now = time.perf_counter()
            train.train_seconds += now - window_start
            # A resumed run's first window also counts iterations of the session before: time only this one's.
            row["seconds_per_iteration"] = (now - window_start) / min(train.window, it - session_first)
            first_in_window = it - train.window + 1
            train.sums, train.window = {}, 0
            self._check_finite(row, first_in_window)
            if it % settings.val_every == 0 or it == total:
                self._validate(learner, val_manifest, train, row)
            train.log.append(row)
            self.progress({"event": "log", "row": row, "total": total, "last_val": train.last_val})
            if it % settings.checkpoint_every == 0 or it == total:
                self._checkpoint(learner, samplers, train)
            window_start = time.perf_counter()

    def _out_of_time(self) -> bool:
        return self.time_limit is not None and time.monotonic() - self._started >= self.time_limit

    def _note_duration(self, seconds: float, steps: int, remaining: int) -> None:
        """On the CPU, say early how long a long run will take and how to shorten it."""
        if self.session.device.type != "cpu":
            return
        expected = seconds / steps * remaining
        if expected < LONG_RUN_SECONDS:
            return
        hours = expected / 3600
        when = f"{hours:.1f} hours" if hours >= 1 else f"{expected / 60:.0f} minutes"
        self.progress({"event": "note", "text": (
            f"note: at {seconds / steps:.2f} s per iteration on this CPU the remaining {remaining} iterations take "
            f"about {when}; for a quick result pass --iterations (e.g. the README walkthrough's settings), or run "
            "on a GPU (--device cuda)")})

    def _check_finite(self, row: dict[str, Any], first: int) -> None:
        loss = row.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise BenchError(
                f"the training loss became {loss} between iterations {first} and {row['iteration']}: training "
                "diverged; try a smaller learning rate (see `bench learners "
                f"{self.plan.learner}`), then run again with --force"
            )

    def _validate(self, learner: Learner, manifest: Manifest, train: TrainState, row: dict[str, Any]) -> None:
        start = time.perf_counter()
        row["val_accuracy"] = train.last_val = float(
            evaluate(learner, manifest, self.session.pools.val, learner.eval_batch_size).mean())
        train.val_seconds += time.perf_counter() - start
        if self.plan.settings.select == "best-val":
            self._keep_if_best(learner, train)

    def _keep_if_best(self, learner: Learner, train: TrainState) -> None:
        """Keep the learner's state if its validation accuracy is among the ``ensemble`` best so far (strictly
        better than the worst kept: on a tie the earlier weights stay)."""
        k = self.plan.settings.ensemble
        if len(train.best) < k:
            slot = len(train.best)
        elif train.last_val > train.best[-1][0]:
            slot = int(train.best.pop()[2])
        else:
            return
        self.dir.save_state(R.best_file(slot), {"learner": learner.state_dict(), "iteration": train.iteration,
                                                "val_accuracy": train.last_val})
        train.best.append([train.last_val, train.iteration, slot])
        train.best.sort(key=lambda entry: (-entry[0], entry[1]))

    def _select_and_evaluate(self, learner: Learner, train: TrainState, manifest: Manifest) -> tuple[torch.Tensor, dict]:
        """The test accuracies of the weights the plan selects: the last iterate, the best validation
        checkpoint, or the mean logits of the ``ensemble`` best validation checkpoints."""
        settings, pool = self.plan.settings, self.session.pools.test
        if settings.select != "best-val" or not train.best:
            selected = {"select": settings.select, "selected_iterations": [train.iteration],
                        "selected_val_accuracy": train.last_val}
            return self._evaluate(learner, manifest, pool), selected
        if settings.ensemble == 1:
            learner.load_state_dict(self.dir.load_state(R.best_file(int(train.best[0][2])), self.session.device)["learner"])
            selected = {"select": "best-val", "selected_iterations": [int(train.best[0][1])],
                        "selected_val_accuracy": float(train.best[0][0])}
            return self._evaluate(learner, manifest, pool), selected
        logits_sum = None
        for _, _, slot in train.best:
            learner.load_state_dict(self.dir.load_state(R.best_file(int(slot)), self.session.device)["learner"])
            logits, labels = manifest_logits(learner, manifest, pool, learner.eval_batch_size)
            logits_sum = logits if logits_sum is None else logits_sum + logits
        accuracies = (logits_sum.argmax(-1) == labels).to(torch.float64).mean(1)
        selected = {"select": "best-val", "ensemble": len(train.best),
                    "selected_iterations": [int(entry[1]) for entry in train.best],
                    "selected_val_accuracy": [float(entry[0]) for entry in train.best]}
        return accuracies.cpu(), selected

    def _evaluate(self, learner: Learner, manifest: Manifest, pool: ClassPool) -> torch.Tensor:
        """Test accuracies [E]; for learners that adapt by steps, also the accuracy after each step (written to
        the run directory)."""
        if not isinstance(learner, AdaptationSteps):
            self._by_step = None
            return evaluate(learner, manifest, pool, learner.eval_batch_size)
        by_step = evaluate_by_step(learner, manifest, pool, learner.eval_batch_size)
        self._by_step = by_step
        return by_step[-1]

    def _checkpoint(self, learner: Learner, samplers: list[Any], train: TrainState) -> None:
        """Checkpoint and log together: the log is rewritten from the rows the checkpoint holds."""
        self.dir.save_state(R.CHECKPOINT, {
            **train.as_dict(), "learner": learner.state_dict(), "samplers": [s.state_dict() for s in samplers],
            "device_type": self.session.device.type,
        })
        self.dir.write_log(train.log)

    def _summary(self, accuracies: torch.Tensor, train: TrainState, eval_seconds: float, manifest: Manifest,
                 selected: dict[str, Any]) -> dict[str, Any]:
        from benchmark.harness.runtime import peak_memory_mb
        from benchmark.reporting.stats import mean_ci

        mean, half_width, std, n = mean_ci(accuracies.numpy())
        iterations = self.plan.settings.iterations
        return {
            "status": "complete",
            "accuracy_mean": mean,
            "ci95": half_width,
            "std": std,
            "n": n,
            "manifest_hash": manifest.hash,
            # Training, validation and the final evaluation, summed over resumed sessions.
            "wall_time_s": round(train.train_seconds + train.val_seconds + eval_seconds, 3),
            "train_seconds": round(train.train_seconds, 3),
            "val_seconds": round(train.val_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "ms_per_iteration": round(1000 * train.train_seconds / iterations, 3) if iterations else None,
            "peak_memory_mb": round(peak_memory_mb(self.session.device), 1),
            "final_val_accuracy": train.last_val,
            **selected,
            "device_name": self.environment["device_name"],
            "sessions": train.sessions,
        }


class _ProgressRecorder:
    """Pass the runner's events on, and keep ``progress.json`` up to date at the events that say where the
    run stands (start, every log row, evaluation, a stop with its checkpoint, done), so that another process
    can tell how far it got and when it will end. Per-step events write nothing: a log row is the natural
    interval."""

    def __init__(self, run_dir: R.RunDirectory, forward: Callable[[dict[str, Any]], None]) -> None:
        import os
        import socket

        self.dir, self.forward = run_dir, forward
        self.record: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "seconds_per_iteration": None}

    def __call__(self, event: dict[str, Any]) -> None:
        self.forward(event)
        kind = event["event"]
        if kind == "start":
            self.record.update(phase="training", iteration=event["iteration"], total=event["total"])
        elif kind == "log":
            self.record.update(iteration=event["row"]["iteration"],
                               seconds_per_iteration=event["row"].get("seconds_per_iteration"))
        elif kind == "evaluate":
            self.record.update(phase="evaluating", iteration=event["iteration"])
        elif kind == "stopped":
            self.record.update(phase="stopped", iteration=event["iteration"], reason=event["reason"])
        elif kind == "done":
            self.record.update(phase="done")
        else:
            return
        self.record["updated"] = time.time()
        self.dir.write_progress(self.record)


class _StopOnSignal:
    """Turn Ctrl-C, SIGTERM and SIGUSR2 into a request that training honours between iterations, so the
    checkpoint is always of a whole iteration; a second Ctrl-C interrupts at once. SIGTERM and SIGUSR2 are
    what Slurm (and submitit) send before a time limit or a preemption."""

    SIGNALS = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "stopped by SIGTERM",
               signal.SIGUSR2: "stopped by SIGUSR2 (time limit or preemption)"}

    def __init__(self) -> None:
        self.reason: str | None = None
        self.exit_code = 0
        #: Set while no iteration boundary is near (evaluation): a signal then raises _Interrupted at once.
        self.immediate = False
        self._previous: dict[int, Any] = {}

    def request(self, reason: str, exit_code: int) -> None:
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.reason is None
        self.request(self.SIGNALS[signum], 128 + signum)
        # Only the first stop interrupts the evaluation: under Slurm the same SIGUSR2/SIGTERM reaches every
        # process of the job step and is forwarded by the sweep's job as well, and a repeat must not break
        # the clean stop that the first one started.
        if self.immediate and first:
            raise _Interrupted(self.SIGNALS[signum], 128 + signum)

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class _Interrupted(Exception):
    """A signal that arrived while no iteration boundary was near."""

    def __init__(self, reason: str, exit_code: int) -> None:
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code
