"""Train a learner, validate it periodically, evaluate it on the fixed test manifest, write its results.

A run is a directory (see ``results.py``). Training checkpoints every ``checkpoint_every`` iterations and on
Ctrl-C; re-running the same command resumes from the last checkpoint. On the CPU a resumed run ends with the
same per-episode results as an uninterrupted one, because every random stream (episode sampler, learner)
lives in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from benchmark import results as R
from benchmark.errors import BenchError, PluginError
from benchmark.learner import Learner, RunContext, config_as_dict
from benchmark.protocol import ClassPool, EpisodeSampler, EpisodeSpec, Manifest, MinibatchSampler, Protocol

#: Validation episodes are drawn with this seed, whatever the training seed, so curves are comparable.
VALIDATION_SEED = 0


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run's result (the device and output folder do not)."""

    learner: str
    learner_config: dict[str, Any]
    way: int
    shot: int
    query: int
    iterations: int
    episodes: int
    seed: int
    episode_seed: int
    protocol: str
    preset: str | None = None
    reduced: bool = False
    val_every: int = 500
    val_episodes: int = 100
    notes: str = ""

    def identity(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]

    @property
    def dirname(self) -> str:
        return f"{self.learner}-{self.way}w{self.shot}s-{self.protocol}-seed{self.seed}-{self.config_hash}"


@dataclass
class Pools:
    """The three splits of a protocol on the run's device."""

    train: ClassPool
    val: ClassPool
    test: ClassPool


@dataclass
class RunOutcome:
    path: Path
    summary: dict[str, Any]
    resumed_from: int = 0
    skipped: bool = False


@dataclass
class TrainState:
    """Where training stands: what a checkpoint holds besides the learner."""

    iteration: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    val_seconds: float = 0.0
    last_val: float | None = None
    #: Metrics accumulated since the last log row (kept across a Ctrl-C so the log matches an unbroken run).
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    window: int = 0


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the GPU when there is one; an absent CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {name} asked for a CUDA GPU, but torch sees none; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def build_learner(learner_cls: type[Learner], config: Any, spec: RunSpec, device: torch.device, pools: Pools) -> Learner:
    context = RunContext(way=spec.way, shot=spec.shot, query=spec.query, device=device, seed=spec.seed,
                         num_train_classes=pools.train.num_classes)
    return learner_cls(config, context)


def evaluate(learner: Learner, manifest: Manifest, pool: ClassPool) -> torch.Tensor:
    """Score ``learner`` on every episode of ``manifest``.

    Returns:
        accuracies [E] float64 on the CPU: the fraction of query images classified correctly per episode.
    """
    spec = manifest.spec
    per_batch = []
    for _, batch in manifest.batches(pool, max(1, learner.eval_batch_size)):
        logits = learner.predict(batch.support_x, batch.support_y, batch.query_x)
        want = (batch.num_tasks, spec.way * spec.query, spec.way)
        if tuple(logits.shape) != want:
            raise PluginError(
                f"learner {learner.name!r} returned logits of shape {list(logits.shape)} from predict, "
                f"expected {list(want)} ([tasks, way*query, way])"
            )
        per_batch.append((logits.argmax(-1) == batch.query_y).to(torch.float64).mean(1).detach())
    return torch.cat(per_batch).cpu()  # one host synchronization for the whole evaluation


def _read_metrics(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Average the accumulated metrics: the only place training synchronizes with the device."""
    if not sums:
        return {}
    keys = sorted(sums)
    values = torch.stack([sums[k].detach().to(torch.float64).cpu() for k in keys]).tolist()
    return {k: v / count for k, v in zip(keys, values)}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Runner:
    """Runs one RunSpec into ``out / spec.dirname`` (or ``out / name``)."""

    def __init__(
        self,
        spec: RunSpec,
        learner_cls: type[Learner],
        config: Any,
        pools: Pools,
        device: torch.device,
        run_dir: Path,
        *,
        log_every: int = 50,
        checkpoint_every: int = 500,
        progress: Callable[[dict[str, Any]], None] | None = None,
        extra_config: dict[str, Any] | None = None,
    ):
        self.spec, self.learner_cls, self.config = spec, learner_cls, config
        self.pools, self.device, self.dir = pools, device, run_dir
        self.log_every, self.checkpoint_every = max(1, log_every), max(1, checkpoint_every)
        self.progress = progress or (lambda event: None)
        self.extra_config = extra_config or {}

    @cached_property
    def environment(self) -> dict[str, Any]:
        """Versions and device of this process (asks git once, for the config record and the summary)."""
        return R.environment(self.device)

    # -- the run directory ----------------------------------------------------------------------------------
    def prepare(self, force: bool) -> str:
        """Create or inspect the run directory: returns "new", "resume" or "done"."""
        config_path = self.dir / R.CONFIG
        if force and config_path.is_file():  # only ever delete what is recognizably a run directory
            shutil.rmtree(self.dir)
        if config_path.is_file():
            recorded = R.read_json(config_path).get("run", {})
            identity = json.loads(json.dumps(self.spec.identity()))  # tuples -> lists, as recorded
            if recorded != identity:
                diff = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
                raise BenchError(
                    f"{self.dir} holds a run with a different config (differs in: {', '.join(diff)}); "
                    "use another --out or --name, or --force to replace it"
                )
            return "done" if (self.dir / R.SUMMARY).is_file() else "resume"
        return "new"

    def _config_record(self, learner: Learner, manifest: Manifest) -> dict[str, Any]:
        return {
            "run": self.spec.identity(),
            "config_hash": self.spec.config_hash,
            "learner": self.spec.learner,
            "learner_config": config_as_dict(self.config),
            "describe": learner.describe(),
            "protocol": self.pools.test.protocol.as_dict(),
            "way": self.spec.way, "shot": self.spec.shot, "query": self.spec.query,
            "iterations": self.spec.iterations, "episodes": self.spec.episodes, "seed": self.spec.seed,
            "episode_seed": self.spec.episode_seed, "preset": self.spec.preset, "reduced": self.spec.reduced,
            "manifest_hash": manifest.hash,
            **self.environment,
            **self.extra_config,
        }

    # -- training ---------------------------------------------------------------------------------------------
    def run(self, force: bool = False) -> RunOutcome:
        state = self.prepare(force)
        if state == "done":
            return RunOutcome(self.dir, R.read_json(self.dir / R.SUMMARY), skipped=True)
        spec = self.spec
        learner = build_learner(self.learner_cls, self.config, spec, self.device, self.pools)
        episode_spec = EpisodeSpec(spec.way, spec.shot, spec.query)
        test_manifest = Manifest.build(self.pools.test, episode_spec, spec.episode_seed, spec.episodes)
        val_manifest = Manifest.build(self.pools.val, episode_spec, VALIDATION_SEED, spec.val_episodes)
        if learner.train_data == "minibatches":
            sampler: Any = MinibatchSampler(self.pools.train, learner.train_batch_size, spec.seed)
        else:
            sampler = EpisodeSampler(self.pools.train, episode_spec, spec.seed)

        train = TrainState()
        if state == "resume" and (self.dir / R.CHECKPOINT).is_file():
            ckpt = torch.load(self.dir / R.CHECKPOINT, map_location=self.device, weights_only=True)
            if ckpt.get("device_type", self.device.type) != self.device.type:
                raise BenchError(
                    f"{self.dir} was started on {ckpt['device_type']} and cannot resume on {self.device.type} "
                    f"(its episode stream is device-specific); pass --device {ckpt['device_type']}, or --force to restart"
                )
            learner.load_state_dict(ckpt["learner"])
            pending = ckpt.get("pending", {})
            sampler.load_state_dict({"generator": ckpt["sampler"]["generator"].cpu()})
            train = TrainState(ckpt["iteration"], ckpt["log"], ckpt["train_seconds"], ckpt.get("val_seconds", 0.0),
                               ckpt.get("last_val"), pending.get("sums", {}), pending.get("window", 0))
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            R.atomic_write_json(self.dir / R.CONFIG, self._config_record(learner, test_manifest))
            R.atomic_write_json(self.dir / R.MANIFEST, test_manifest.to_json(self.pools.test))
        resumed_from = train.iteration
        self.progress({"event": "start", "iteration": train.iteration, "total": spec.iterations, "dir": self.dir})

        with _StopAtIterationBoundary() as stop:
            self._train(learner, sampler, val_manifest, train, stop)
        if stop.requested:
            self._checkpoint(learner, sampler, train)
            raise BenchError(
                f"interrupted at iteration {train.iteration}; run the same command again to resume from it"
            )

        t0 = time.perf_counter()
        accuracies = evaluate(learner, test_manifest, self.pools.test)
        eval_seconds = time.perf_counter() - t0
        summary = self._summary(accuracies, train, eval_seconds, test_manifest)
        R.atomic_write_csv(self.dir / R.EPISODES, ["episode", "accuracy"],
                           ((i, f"{a:.6f}") for i, a in enumerate(accuracies.tolist())))
        R.atomic_write_json(self.dir / R.SUMMARY, summary)  # written last: its presence means "complete"
        self.progress({"event": "done", "summary": summary})
        return RunOutcome(self.dir, summary, resumed_from=resumed_from)

    def _train(self, learner: Learner, sampler: Any, val_manifest: Manifest, train: TrainState,
               stop: _StopAtIterationBoundary) -> None:
        spec, batch_size = self.spec, learner.train_batch_size
        window_start = time.perf_counter()
        while train.iteration < spec.iterations:
            if stop.requested:
                train.train_seconds += time.perf_counter() - window_start
                return
            batch = sampler.sample() if learner.train_data == "minibatches" else sampler.sample(batch_size)
            metrics = learner.meta_train_step(batch)
            for k, v in metrics.items():  # accumulate on the device: no synchronization here
                v = torch.as_tensor(v, device=self.device).detach()
                train.sums[k] = train.sums[k] + v if k in train.sums else v.clone()
            train.iteration += 1
            train.window += 1
            it = train.iteration
            at_end = it == spec.iterations
            if it % self.log_every == 0 or at_end or it % spec.val_every == 0 or it % self.checkpoint_every == 0:
                row = {"iteration": it, **_read_metrics(train.sums, train.window)}  # synchronizes the device
                now = time.perf_counter()
                train.train_seconds += now - window_start
                row["seconds_per_iteration"] = (now - window_start) / train.window
                train.sums, train.window = {}, 0
                if it % spec.val_every == 0 or at_end:
                    val_start = time.perf_counter()
                    row["val_accuracy"] = train.last_val = float(evaluate(learner, val_manifest, self.pools.val).mean())
                    train.val_seconds += time.perf_counter() - val_start
                train.log.append(row)
                self.progress({"event": "log", "row": row, "total": spec.iterations, "last_val": train.last_val})
                if it % self.checkpoint_every == 0 or at_end:
                    self._checkpoint(learner, sampler, train)
                window_start = time.perf_counter()

    def _checkpoint(self, learner: Learner, sampler: Any, train: TrainState) -> None:
        """Checkpoint and log together: the log is rewritten from the rows the checkpoint holds."""
        R.atomic_torch_save(self.dir / R.CHECKPOINT, {
            "iteration": train.iteration, "learner": learner.state_dict(), "sampler": sampler.state_dict(),
            "log": train.log, "train_seconds": train.train_seconds, "val_seconds": train.val_seconds,
            "last_val": train.last_val,
            "pending": {"sums": train.sums, "window": train.window}, "device_type": self.device.type,
        })
        keys = ["iteration"] + sorted({k for row in train.log for k in row} - {"iteration"})
        R.atomic_write_csv(self.dir / R.TRAIN_LOG, keys, ([row.get(k, "") for k in keys] for row in train.log))

    def _summary(self, accuracies: torch.Tensor, train: TrainState, eval_seconds: float, manifest: Manifest) -> dict:
        from benchmark.stats import mean_ci

        mean, half_width, std, n = mean_ci(accuracies.numpy())
        iterations = max(1, self.spec.iterations)
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
            "ms_per_iteration": round(1000 * train.train_seconds / iterations, 3) if self.spec.iterations else None,
            "peak_memory_mb": round(_peak_memory_mb(self.device), 1),
            "final_val_accuracy": train.last_val,
            "device_name": self.environment["device_name"],
        }


class _StopAtIterationBoundary:
    """Turn the first Ctrl-C into a request that training honours between iterations, so the checkpoint
    is always of a whole iteration; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopAtIterationBoundary:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def load_pools(data, protocol: Protocol, device: torch.device) -> Pools:
    return Pools(*(ClassPool(data, protocol, split, device) for split in ("train", "val", "test")))

