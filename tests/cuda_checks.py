"""Checks shared by the CUDA tests (``-m gpu``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch


def last_step_without_host_sync(learner: Any, batches: Sequence[Any]) -> Mapping[str, torch.Tensor]:
    """Train ``learner`` on every batch, the last one with host synchronization an error.

    The steps before it warm up (and capture, with a CUDA graph); in the last one any value read back, or any
    copy from pageable host memory, raises. Returns the last step's metrics.
    """
    for batch in batches[:-1]:
        learner.meta_train_step(batch)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return learner.meta_train_step(batches[-1])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
