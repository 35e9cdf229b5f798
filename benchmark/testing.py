"""Test helpers for learner authors (ours and strangers'): tiny fake data and the learner contract.

Use in a plugin's test suite::

    from benchmark.testing import check_learner
    from bench_nearest import NearestMean

    def test_contract():
        check_learner(NearestMean)

``check_learner`` builds the learner on a few random images (no Omniglot needed), trains two steps and
checks what the harness relies on; a violation raises ``AssertionError`` saying which rule broke and how to
fix it. Every random number here comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Iterable, Mapping, Sequence

import torch

from benchmark import hookimpl
from benchmark.episodes import EpisodeBatch, LabeledBatch
from benchmark.learner import Episodes, Learner, RunContext

IMAGE_SHAPE = (1, 28, 28)


# -- fake data ----------------------------------------------------------------------------------------------
def _prototypes(count: int, generator: torch.Generator, leading: Sequence[int] = ()) -> torch.Tensor:
    """Random sparse binary "characters": [*leading, count, 1, 28, 28] with about 15% ink."""
    return (torch.rand(*leading, count, *IMAGE_SHAPE, generator=generator) < 0.15).float()


def _drawings(prototypes: torch.Tensor, generator: torch.Generator, flip: float = 0.05) -> torch.Tensor:
    """Noisy copies of ``prototypes`` (same shape): each pixel flipped with probability ``flip``, so drawings
    of one class differ but stay closer to each other than to other classes."""
    mask = torch.rand(prototypes.shape, generator=generator) < flip
    return torch.where(mask, 1.0 - prototypes, prototypes)


def fake_episode_batch(
    way: int = 5, shot: int = 1, query: int = 2, tasks: int = 2, seed: int = 0, device: torch.device | str = "cpu"
) -> EpisodeBatch:
    """T random episodes with the layout of real ones.

    Examples are grouped by class, and each task gives its classes the labels 0..N-1 in a random order (as
    the real sampler does), so a learner that assumes ``support_y == [0, 0, 1, 1, ...]`` is caught.

    Returns:
        EpisodeBatch with support_x [T, N*K, 1, 28, 28], support_y [T, N*K], query_x [T, N*Q, 1, 28, 28],
        query_y [T, N*Q].
    """
    g = torch.Generator().manual_seed(seed)
    protos = _prototypes(way, g, leading=(tasks,))  # [T, N, 1, 28, 28]
    labels = torch.stack([torch.randperm(way, generator=g) for _ in range(tasks)])  # [T, N]: label of class n

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = _drawings(protos.unsqueeze(2).expand(tasks, way, per_class, *IMAGE_SHAPE).contiguous(), g)
        y = labels.unsqueeze(2).expand(tasks, way, per_class)
        return x.reshape(tasks, way * per_class, *IMAGE_SHAPE), y.reshape(tasks, way * per_class).contiguous()

    support_x, support_y = draw(shot)
    query_x, query_y = draw(query)
    return EpisodeBatch(support_x, support_y, query_x, query_y, way, shot, query).to(device)


def fake_labeled_batch(
    batch_size: int = 16, num_classes: int = 10, seed: int = 0, device: torch.device | str = "cpu"
) -> LabeledBatch:
    """A random classification minibatch: x [B, 1, 28, 28] float32, y [B] int64 in 0..num_classes-1."""
    g = torch.Generator().manual_seed(seed)
    protos = _prototypes(num_classes, g)
    y = torch.randint(num_classes, (batch_size,), generator=g)
    return LabeledBatch(_drawings(protos[y], g).to(device), y.to(device), num_classes)


# -- registering learners in tests --------------------------------------------------------------------------
class _InlinePlugin:
    """A plugin object that registers the given learner classes."""

    def __init__(self, learner_classes: Iterable[type]) -> None:
        self.learner_classes = list(learner_classes)

    @hookimpl
    def bench_register_learners(self, register) -> None:
        for cls in self.learner_classes:
            register(cls)


def register_learner_plugin(pm: Any, *learner_classes: type, name: str | None = None) -> object:
    """Register learner classes with a plugin manager as if a plugin provided them.

    Example::

        from benchmark.harness.plugins import get_plugin_manager, load_registry
        pm = get_plugin_manager()
        register_learner_plugin(pm, MyLearner)
        assert load_registry(pm=pm).get("mine") is MyLearner   # also catches a name clash

    Returns:
        the plugin object (pass it to ``pm.unregister`` to remove it again).
    """
    plugin = _InlinePlugin(learner_classes)
    pm.register(plugin, name=name or "inline:" + ",".join(c.__qualname__ for c in learner_classes))
    return plugin


# -- the contract -------------------------------------------------------------------------------------------
def check_learner(
    learner_cls: type,
    *,
    way: int = 5,
    shot: int = 1,
    query: int = 2,
    device: torch.device | str = "cpu",
    steps: int = 2,
    config: Any = None,
    tasks: int = 2,
    num_train_classes: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Check that a learner keeps the contract the harness relies on; raise AssertionError if not.

    Checks, in order: the class (Learner subclass, ``name``, frozen dataclass ``Config`` whose fields have
    defaults, help lines and supported types; ``training``, ``meta_train_step``, ``predict``, ``state_dict``
    and ``load_state_dict`` defined); ``training()`` declares its phases; ``steps`` meta-train steps (on
    the first phase's batch type) return finite scalar metrics; ``predict`` returns finite logits
    [T, N*Q, N] on ``device`` and changes neither the state-dict tensors, nor the buffers of the learner's
    ``torch.nn`` modules (batch-norm running statistics), nor its inputs; the same seed gives identical
    metrics and logits; the state dict holds only tensors and plain values (``torch.load(weights_only=True)``
    reads it) and a fresh learner that loads it predicts the same logits.

    Args:
        learner_cls: the learner class.
        way, shot, query: episode shape (keep it small: the data is fake).
        device: where batches are put and the learner runs.
        steps: meta-train steps before predicting (at least 2: the resume check restores after the first).
        config: the config to build with (default: ``learner_cls.default_config(way, shot)``).
        tasks: episodes per training batch and in the prediction batch (regardless of the config's meta
            batch size, to stay fast); minibatch learners get ``4 * way`` images per step.
        num_train_classes: classes of the fake meta-train split (``RunContext.num_train_classes``).
        seed: the run seed.

    Returns:
        ``{"metrics": [dict per step], "logits_shape": (T, N*Q, N)}`` for further checks.
    """
    _check_class(learner_cls)
    config = learner_cls.default_config(way, shot) if config is None else config
    assert isinstance(config, learner_cls.Config), (
        f"{learner_cls.__qualname__}.default_config returned {type(config).__qualname__}, expected an instance of "
        f"{learner_cls.__qualname__}.Config"
    )
    assert steps >= 2, "check_learner needs steps >= 2 to check resuming after the first step"
    device = torch.device(device)
    exact = device.type == "cpu"  # GPU kernels may reorder float sums between runs; CPU ones must not
    context = RunContext(way, shot, query, device, seed=seed, num_train_classes=num_train_classes, iterations=steps)
    phase = _first_phase(learner_cls(config, context))
    train_batches = [
        _train_batch(phase, way, shot, query, tasks, num_train_classes, seed=1000 + i, device=device)
        for i in range(steps)
    ]
    test = fake_episode_batch(way, shot, query, tasks, seed=2000, device=device)

    learner, metrics = _train(learner_cls, config, context, train_batches)
    logits = _check_predict(learner, test, device)
    _check_same_seed_same_results(learner_cls, config, context, train_batches, metrics, logits, test, exact)
    _check_state_dict(learner_cls, config, context, learner, train_batches, metrics, logits, test, exact)
    return {"metrics": metrics, "logits_shape": tuple(logits.shape)}


def _check_predict(learner: Learner, test: EpisodeBatch, device: torch.device) -> torch.Tensor:
    """predict's logits are well-formed, and it changes neither the learner (parameters, buffers) nor its inputs."""
    inputs = (test.support_x, test.support_y, test.query_x)
    params_before = state_tensors(learner.state_dict())
    buffers_before = module_buffers(learner)
    inputs_before = [x.clone() for x in inputs]
    logits = learner.predict(*inputs)
    _check_logits(logits, test, device)
    _check_unchanged(params_before, state_tensors(learner.state_dict()))
    changed = changed_tensors(buffers_before, module_buffers(learner))
    assert not changed, (
        f"predict changed the buffer {changed[0]!r} (e.g. batch-norm running statistics); predict must leave the "
        "learner's modules alone: run them in eval mode or with torch.func.functional_call"
    )
    for name, before, after in zip(("support_x", "support_y", "query_x"), inputs_before, inputs):
        assert torch.equal(before, after), f"predict modified its input {name} in place; work on a copy"
    return logits


def _check_same_seed_same_results(learner_cls: type, config: Any, context: RunContext, train_batches: list,
                                  metrics: list[dict], logits: torch.Tensor, test: EpisodeBatch, exact: bool) -> None:
    twin, twin_metrics = _train(learner_cls, config, context, train_batches)
    for step, (a, b) in enumerate(zip(metrics, twin_metrics)):
        _assert_close(a, b, exact, f"meta_train_step {step} metrics differ between two runs with the same seed")
    _assert_close(
        logits, twin.predict(test.support_x, test.support_y, test.query_x), exact,
        "predict gives different logits for two learners trained with the same seed",
    )


def _check_state_dict(learner_cls: type, config: Any, context: RunContext, learner: Learner, train_batches: list,
                      metrics: list[dict], logits: torch.Tensor, test: EpisodeBatch, exact: bool) -> None:
    """A fresh learner that loads the state predicts the same; one restored after step 1 trains on exactly."""
    inputs = (test.support_x, test.support_y, test.query_x)
    fresh = learner_cls(config, context)
    fresh.load_state_dict(_round_trip(learner.state_dict()))
    _assert_close(
        logits, fresh.predict(*inputs), exact,
        "a fresh learner that loaded state_dict() predicts different logits; state_dict must hold everything "
        "predict depends on",
    )
    # Resume: a learner restored after the first step must continue exactly like the one that never stopped
    # (this catches optimizer or RNG state missing from state_dict).
    first, _ = _train(learner_cls, config, context, train_batches[:1])
    resumed = learner_cls(config, context)
    resumed.load_state_dict(_round_trip(first.state_dict()))
    for step, batch in enumerate(train_batches[1:], start=1):
        got = {k: _scalar(k, v, step) for k, v in resumed.meta_train_step(batch).items()}
        _assert_close(got, metrics[step], exact,
                      f"a learner restored from state_dict() after step 1 gives different step-{step + 1} metrics")
    _assert_close(
        logits, resumed.predict(*inputs), exact,
        "a learner restored from state_dict() after step 1 and trained on predicts different logits "
        "than one trained without interruption; state_dict must hold all training state (e.g. optimizer moments)",
    )


def _check_class(learner_cls: Any) -> None:
    from benchmark.errors import PluginError
    from benchmark.harness.plugins import check_learner_class

    assert isinstance(learner_cls, type) and issubclass(learner_cls, Learner), (
        f"{learner_cls!r} is not a subclass of benchmark.learner.Learner"
    )
    qual = learner_cls.__qualname__
    assert isinstance(learner_cls.name, str) and learner_cls.name, f"{qual} has no `name` class attribute"
    cfg = learner_cls.Config
    assert dataclasses.is_dataclass(cfg) and isinstance(cfg, type), f"{qual}.Config is not a dataclass"
    assert cfg.__dataclass_params__.frozen, f"{qual}.Config must be frozen: use @dataclass(frozen=True)"
    try:
        check_learner_class(learner_cls, f"class {qual}")
    except PluginError as exc:
        raise AssertionError(str(exc)) from None


def _first_phase(learner: Learner) -> Any:
    phases = list(learner.training())
    assert phases, f"{type(learner).__qualname__}.training() returned no phase; return e.g. [Episodes(tasks=32)]"
    return phases[0]


def _train_batch(
    phase: Any, way: int, shot: int, query: int, tasks: int, classes: int, seed: int, device: torch.device
) -> EpisodeBatch | LabeledBatch:
    if not isinstance(phase, Episodes):
        return fake_labeled_batch(4 * way, classes, seed=seed, device=device)
    return fake_episode_batch(way, shot, query, tasks, seed=seed, device=device)


def _train(
    learner_cls: type, config: Any, context: RunContext, batches: Sequence[Any]
) -> tuple[Learner, list[dict[str, float]]]:
    learner = learner_cls(config, context)
    history = []
    for step, batch in enumerate(batches):
        raw = learner.meta_train_step(batch)
        assert isinstance(raw, Mapping), f"meta_train_step returned {type(raw).__name__}; return a dict of metrics"
        history.append({key: _scalar(key, value, step) for key, value in raw.items()})
    return learner, history


def _scalar(key: str, value: Any, step: int) -> float:
    if isinstance(value, torch.Tensor):
        assert value.numel() == 1, (
            f"metric {key!r} of meta_train_step {step} has shape {tuple(value.shape)}; return a 0-dim tensor or float"
        )
        number = float(value.detach().cpu())
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (
            f"metric {key!r} of meta_train_step {step} is {type(value).__name__}; return a 0-dim tensor or float"
        )
        number = float(value)
    assert math.isfinite(number), f"metric {key!r} of meta_train_step {step} is not finite ({number})"
    return number


def _check_logits(logits: Any, test: EpisodeBatch, device: torch.device) -> None:
    expected = (test.num_tasks, test.way * test.query, test.way)
    assert isinstance(logits, torch.Tensor), f"predict returned {type(logits).__name__}; return a tensor"
    assert tuple(logits.shape) == expected, (
        f"predict returned logits of shape {tuple(logits.shape)}, expected [T, N*Q, N] = {list(expected)}"
    )
    assert logits.is_floating_point(), f"predict returned {logits.dtype} logits; return floating-point scores"
    assert logits.device.type == device.type, f"predict returned logits on {logits.device}, expected {device}"
    assert bool(torch.isfinite(logits).all()), "predict returned non-finite logits (nan or inf)"


def state_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) state dict, cloned, by dotted path."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(state, torch.Tensor):
        found[prefix or "<state>"] = state.detach().clone()
    elif isinstance(state, Mapping):
        for key, value in state.items():
            found.update(state_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            found.update(state_tensors(value, f"{prefix}.{i}" if prefix else str(i)))
    return found


def module_buffers(learner: Any) -> dict[str, torch.Tensor]:
    """The buffers (e.g. batch-norm running statistics) of every ``torch.nn.Module`` the learner holds as an
    attribute, cloned, by ``attribute.buffer`` name."""
    found = {}
    for attr, value in vars(learner).items():
        if isinstance(value, torch.nn.Module):
            for name, buf in value.named_buffers():
                found[f"{attr}.{name}"] = buf.detach().clone()
    return found


def changed_tensors(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose tensor differs (or vanished) between two snapshots."""
    return [k for k in before if k not in after or before[k].shape != after[k].shape
            or not torch.equal(before[k], after[k])]


def _check_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys(), (
        f"predict changed the state dict's entries ({sorted(before.keys() ^ after.keys())}); predict must not "
        "change meta-parameters"
    )
    changed = changed_tensors(before, after)
    assert not changed, (
        f"predict changed meta-parameters {changed[:5]}; adapt a copy (e.g. a parameter dict) and leave the "
        "learner's own tensors untouched"
    )


def _round_trip(state: Any) -> Any:
    """``state`` saved with torch.save and read back with ``weights_only=True`` (what checkpoints use)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        return torch.load(buffer, weights_only=True)
    except Exception as exc:  # the unpickler names the offending type
        raise AssertionError(
            f"state_dict() cannot be loaded with torch.load(weights_only=True): {exc}. Keep only tensors and plain "
            "values (dicts, lists, numbers, strings) in it; store configs as dicts, not dataclass objects"
        ) from None


def _assert_close(a: Any, b: Any, exact: bool, message: str) -> None:
    if isinstance(a, torch.Tensor):
        same = torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        if not same:
            diff = (a - b).abs().max().item() if a.shape == b.shape else "shape differs"
            raise AssertionError(f"{message} (max abs difference {diff})")
        return
    assert a.keys() == b.keys(), f"{message} (keys {sorted(a)} vs {sorted(b)})"
    for key in a:
        same = a[key] == b[key] if exact else math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6)
        assert same, f"{message}: {key!r} is {a[key]} vs {b[key]}"
