"""The batches a learner sees. Batch-first: a leading task dimension T, so a learner may loop or vmap over it.

Images are float32 in [0, 1] with ink 1 and paper 0, shape [.., 1, 28, 28]. Labels are int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EpisodeBatch:
    """T few-shot episodes of N classes, K support and Q query drawings per class.

    Within an episode the classes are distinct, labels are 0..N-1 assigned in a random order, and support and
    query hold disjoint drawings of the same classes. Examples come in a random order within the support and
    the query set (so the order says nothing about the labels): use ``support_y``, never positions.

    Attributes:
        support_x: [T, N*K, 1, 28, 28] float32
        support_y: [T, N*K] int64 in 0..N-1
        query_x: [T, N*Q, 1, 28, 28] float32
        query_y: [T, N*Q] int64 in 0..N-1 (the harness scores with it; ``predict`` never sees it)
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    way: int
    shot: int
    query: int

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.support_x.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EpisodeBatch:
        """The same episodes on ``device`` (images cast to ``dtype`` when given)."""
        cast = (lambda x: x.to(device=device, dtype=dtype)) if dtype else (lambda x: x.to(device))
        return EpisodeBatch(
            cast(self.support_x), self.support_y.to(device), cast(self.query_x), self.query_y.to(device),
            self.way, self.shot, self.query,
        )

    def tasks(self, start: int, stop: int) -> EpisodeBatch:
        """Episodes ``start:stop`` (for per-task loops and chunked evaluation)."""
        return EpisodeBatch(
            self.support_x[start:stop], self.support_y[start:stop], self.query_x[start:stop],
            self.query_y[start:stop], self.way, self.shot, self.query,
        )


@dataclass(frozen=True)
class LabeledBatch:
    """A plain classification minibatch over all meta-train classes (for pre-training baselines).

    Attributes:
        x: [B, 1, 28, 28] float32
        y: [B] int64 in 0..num_classes-1 (the class index within the meta-train split)
        num_classes: number of meta-train classes (rotations counted as classes)
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
