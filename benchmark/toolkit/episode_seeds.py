"""Per-episode random generators that depend on the episode alone.

A learner that draws random numbers at test time (a head's initialisation, the order of minibatches) should
give an episode the same prediction whichever other episodes share its ``predict`` call and wherever it
stands there: otherwise ``eval_batch_size`` or an ensemble's batching would change results. Seeding each
episode's generator from the run's seed and the episode's own content does that.
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmark.learner import seed_from


def episode_generators(context_generator: Callable[[str], torch.Generator], support_x: torch.Tensor,
                       support_y: torch.Tensor, purpose: str) -> list[torch.Generator]:
    """One CPU generator per episode, seeded from the run's seed, ``purpose`` and the episode's own content.

    The key uses exact integer-valued sums of the images (float64) and the support labels, so it is the same
    on every device and batch layout.

    Args:
        context_generator: ``RunContext.generator`` of the run.
        support_x: [T, S, 1, 28, 28]; support_y: [T, S]
        purpose: names the stream (learners with several random needs use one purpose each).
    """
    flat = support_x.flatten(2).to(torch.float64)  # [T, S, P]
    positions = torch.arange(1, flat.shape[-1] + 1, dtype=torch.float64, device=flat.device)
    quantized = (flat * 255).round()  # integer intensities: the sums below are exact
    keys = torch.stack([quantized.sum(dim=(1, 2)), (quantized * positions).sum(dim=(1, 2))], dim=1).cpu().tolist()
    labels = support_y.cpu().tolist()
    base = int(torch.randint(0, 2**62, (1,), generator=context_generator(purpose)).item())
    return [torch.Generator().manual_seed(seed_from(repr((base, key, y)))) for key, y in zip(keys, labels)]
