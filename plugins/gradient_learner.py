"""The learner machinery the gradient-based meta-learners share: speed switches and the Adam meta-update.

``MetaGradientLearner`` is MAML's learner with the algorithm left to subclasses: they say how a task adapts
(``build_inner``: an ``InnerLoop``) and what the meta-parameters are (``init_params``); the base class
trains them with Adam on the meta-gradient of the query loss, tests by adapting to each episode
(``predict``, and ``predict_steps`` for the accuracy after each step), saves and restores its state, and
offers ``bench perf`` its plain per-task loop (``PerfVariants``).

Speed switches (config fields; the options below declare them once for every learner):

* ``vectorize``: ``torch.func`` under ``vmap`` over tasks (``plugins.gradient``), or the plain per-task loop
  (``plugins.gradient_reference``); by default vmap on CUDA and for small tasks on the CPU.
* ``cuda_graph`` (default on CUDA): the whole meta-update, Adam step included, is captured once in a CUDA
  graph and replayed (``benchmark.toolkit.graphs.GraphedStep``); Adam runs with ``capturable=True``.
* ``compile`` (default off): ``torch.compile`` of the vmapped meta-gradient. Compilation costs minutes once
  per process (the README's performance section has the measurements), so it only pays for long runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

from benchmark.config import option
from benchmark.episodes import EpisodeBatch
from benchmark.errors import ConfigError
from benchmark.learner import Episodes, Learner, RunContext
from benchmark.toolkit.conv4 import Params, load_training_state, training_state
from benchmark.toolkit.graphs import GraphedStep
from plugins.gradient import InnerLoop, vectorized_adapted_logits, vectorized_meta_gradient
from plugins.gradient_reference import reference_adapted_logits, reference_meta_gradient

GradientFn = Callable[..., tuple[Params, torch.Tensor, torch.Tensor]]

#: On the CPU, vmap wins only while a task is small; above this the loop's fused native batch norm wins
#: (`bench perf --ablation` measures both; the README's performance section has the figures).
CPU_VMAP_MAX_IMAGES_PER_TASK = 20


# -- config fields every learner here declares the same way --------------------------------------------------
def vectorize_option(default_rule: str = "vmap on CUDA, and on the CPU for tasks of at most 20 images (larger "
                                         "ones run faster in the loop)") -> Any:
    return option(None, f"true: vmap over tasks; false: the per-task loop; none (default): {default_rule}")


def cuda_graph_option(default_rule: str = "on when the device is CUDA") -> Any:
    return option(None, "capture the whole meta-update (its optimizer step included) in a CUDA graph and replay "
                        f"it; none (default): {default_rule}")


def compile_option() -> Any:
    return option(False, "torch.compile the vmapped meta-gradient (needs vectorize); compilation costs minutes once "
                         "per process (see the README's performance section)")


def eval_batch_size_option() -> Any:
    return option(25, "test episodes adapted at once in predict", min=1, max=10_000)


def vmap_is_faster(context: RunContext) -> bool:
    """The default of ``vectorize``: vmap on CUDA (batched kernels win by far), on the CPU only for small tasks."""
    if context.device.type == "cuda":
        return True
    return context.way * (context.shot + context.query) <= CPU_VMAP_MAX_IMAGES_PER_TASK


def validate_switches(config: Any, context: RunContext, vectorized: bool, graphed: bool) -> None:
    """Refuse switch combinations that cannot run, naming the option to change."""
    if graphed and context.device.type != "cuda":
        raise ConfigError(f"cuda_graph=true needs a CUDA device, not {context.device.type}: run with --device cuda "
                          "or pass -o cuda_graph=false")
    if getattr(config, "compile", False) and not vectorized:
        raise ConfigError("compile=true compiles the vectorized path: pass -o vectorize=true as well, or drop "
                          "-o compile=true")


def same_way_only(name: str, context: RunContext) -> None:
    """Learners with one output per class of the episode train and test with the same way."""
    if context.train_way != context.way:
        raise ConfigError(f"{name} has one output per class, so it trains and tests with the same way: "
                          f"drop --train-way (got train way {context.train_way}, test way {context.way})")


def compiled(fn: GradientFn, backend: str = "inductor") -> GradientFn:
    """``torch.compile(fn)`` (static shapes), with a failure turned into an error that names the switch.

    Compilation happens at the first call, so that is where an unsupported PyTorch build shows up.
    ``backend="aot_eager"`` (tests) traces exactly as inductor does but runs the traced ops eagerly.
    """
    compiled_fn = torch.compile(fn, dynamic=False, backend=backend)
    from torch._dynamo.exc import TorchDynamoException  # tracing and backend failures (not OOM, not bugs)

    def call(*args: Any) -> tuple[Params, torch.Tensor, torch.Tensor]:
        try:
            return compiled_fn(*args)
        except TorchDynamoException as exc:
            raise ConfigError(
                f"torch.compile failed on torch {torch.__version__} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): run with -o compile=false"
            ) from exc

    return call


class SpeedVariants:
    """``benchmark.learner.PerfVariants`` for a config with ``vectorize``, ``cuda_graph`` and (optionally)
    ``compile`` fields."""

    @classmethod
    def reference_config(cls, config: Any) -> Any:
        """The plain per-task loop of the same algorithm, which ``bench perf`` times beside the shipped one."""
        return dataclasses.replace(config, vectorize=False, cuda_graph=False,
                                   **({"compile": False} if hasattr(config, "compile") else {}))

    @classmethod
    def ablation_configs(cls, config: Any) -> dict[str, Any]:
        """For ``bench perf --ablation``: plain vmap, then vmap with each speed switch that ``config`` turns on
        (or leaves to the device), one at a time, so each switch's share of the speed-up is measured."""
        plain = dataclasses.replace(config, vectorize=True, cuda_graph=False,
                                    **({"compile": False} if hasattr(config, "compile") else {}))
        variants = {"vmap": plain}
        if config.cuda_graph is not False:
            variants["vmap + cuda graph"] = dataclasses.replace(plain, cuda_graph=True)
        if getattr(config, "compile", False):
            variants["vmap + compile"] = dataclasses.replace(plain, compile=True)
        return variants


class AdaptedPrediction:
    """``predict`` and ``predict_steps`` (``benchmark.learner.AdaptationSteps``) of a learner that adapts to each
    test episode by steps, both from its ``_adapted_logits(support_x, support_y, query_x, every_step)``."""

    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        return self._adapted_logits(support_x, support_y, query_x, every_step=False)

    def predict_steps(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Logits [S+1, T, N*Q, N] after 0..S test-time steps."""
        return self._adapted_logits(support_x, support_y, query_x, every_step=True)


class MetaGradientLearner(SpeedVariants, AdaptedPrediction, Learner):
    """Meta-parameters trained by Adam on the meta-gradient of the query loss after inner adaptation.

    Subclasses define ``build_inner`` and ``init_params``; they may override ``first_order`` (per
    iteration), ``step_weights`` (MAML++'s multi-step loss) and ``before_update``/``after_update`` (schedules).
    The config needs ``meta_batch_size``, ``meta_lr``, ``test_inner_steps``, ``eval_batch_size`` and the
    speed switches.
    """

    def __init__(self, config: Any, context: RunContext, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, context)
        same_way_only(self.name, context)
        self.dtype = dtype
        self.inner: InnerLoop = self.build_inner()
        self.params: Params = self.init_params(context.generator("init"))
        self.vectorized = config.vectorize if config.vectorize is not None else self.vmap_default(context)
        self.graphed = config.cuda_graph if config.cuda_graph is not None else context.device.type == "cuda"
        validate_switches(config, context, self.vectorized, self.graphed)
        # capturable: Adam keeps its step count on the device, so its update can be replayed from a graph.
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.meta_lr, capturable=self.graphed)
        self._gradient_fn: GradientFn = vectorized_meta_gradient if self.vectorized else reference_meta_gradient
        if getattr(config, "compile", False):
            self._gradient_fn = compiled(vectorized_meta_gradient)
        self._graph = GraphedStep(self._update, context.device, state=self._updated_tensors) if self.graphed else None
        self._shape = (context.way, context.shot, context.query)  # (N, K, Q) of the batches _update receives

    # -- what subclasses define ------------------------------------------------------------------------------
    def build_inner(self) -> InnerLoop:
        raise NotImplementedError

    def init_params(self, generator: torch.Generator) -> Params:
        """Fresh meta-parameters on ``self.context.device`` in ``self.dtype``, drawn from ``generator``."""
        raise NotImplementedError

    @property
    def first_order(self) -> bool:
        return self.config.first_order

    def step_weights(self) -> torch.Tensor | None:
        """Weights of the query losses after the last W inner steps ([W], on the device), or None for the
        last step's loss alone."""
        return None

    def before_update(self) -> None:
        """Host-side work before each meta-update (e.g. a learning-rate schedule)."""

    def after_update(self) -> None:
        """Host-side work after each meta-update."""

    def vmap_default(self, context: RunContext) -> bool:
        return vmap_is_faster(context)

    # -- the harness's API -----------------------------------------------------------------------------------
    def training(self) -> list[Episodes]:
        return [Episodes(tasks=self.config.meta_batch_size)]

    @property
    def eval_batch_size(self) -> int:
        return self.config.eval_batch_size

    def implementation(self) -> dict[str, Any]:
        return {"tasks": "vmap" if self.vectorized else "loop", "cuda graph": self.graphed,
                "compiled": getattr(self.config, "compile", False)}

    def _updated_tensors(self) -> list[torch.Tensor]:
        """What a meta-update changes in place: the parameters and Adam's state (moments, step count)."""
        state = [t for p in self.params.values() for t in self.optimizer.state.get(p, {}).values()
                 if isinstance(t, torch.Tensor)]
        return list(self.params.values()) + state

    def _frozen_params(self) -> Params:
        return {k: v.detach() for k, v in self.params.items()}

    def meta_train_step(self, batch: EpisodeBatch) -> Mapping[str, torch.Tensor]:
        batch = batch.to(self.context.device)
        self._shape = (batch.way, batch.shot, batch.query)
        self.before_update()
        weights = self.step_weights()
        inputs = (batch.support_x, batch.support_y, batch.query_x, batch.query_y, *(() if weights is None else (weights,)))
        loss, acc = self._graph(*inputs) if self._graph is not None else self._update(*inputs)
        self.after_update()
        return {"loss": loss, "accuracy": acc}

    def _update(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                query_y: torch.Tensor, *step_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One meta-update in place (parameters and Adam state): the step a CUDA graph captures.

        Args:
            support_x: [T, N*K, 1, 28, 28]; support_y: [T, N*K]; query_x: [T, N*Q, 1, 28, 28]; query_y: [T, N*Q]
                (images in any float dtype; they are cast to the learner's).
            step_weights: at most one [W] tensor, the weights of the query losses after the last W steps.

        Returns:
            (mean query loss, mean query accuracy) over the T tasks, 0-dim, after adaptation.
        """
        batch = EpisodeBatch(support_x.to(self.dtype), support_y, query_x.to(self.dtype), query_y, *self._shape)
        grads, loss, acc = self._gradient_fn(self._frozen_params(), batch, self.inner, self.first_order, *step_weights)
        for k, p in self.params.items():
            p.grad = grads[k]
        try:
            self.optimizer.step()
        finally:  # also when a CUDA-graph capture fails inside step(): drop gradients from its memory pool
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), acc.detach()

    def _adapted_logits(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                        every_step: bool) -> torch.Tensor:
        fn = vectorized_adapted_logits if self.vectorized else reference_adapted_logits
        with torch.enable_grad():  # adaptation needs gradients even if a caller disabled them
            logits = fn(self._frozen_params(), support_x.to(self.dtype), support_y, query_x.to(self.dtype),
                        self.inner, self.config.test_inner_steps, every_step)
        return logits.detach()

    def state_dict(self) -> dict[str, Any]:
        """``{"params": {name: tensor}, "optimizer": Adam state}`` as independent copies."""
        return training_state(self.params, self.optimizer)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_training_state(self.params, self.optimizer, state)
        for group in self.optimizer.param_groups:  # loading copies the saved groups' flags: keep ours
            group["capturable"] = self.graphed
        if self._graph is not None:  # the optimizer's state tensors were replaced: capture them anew
            self._graph.reset()
