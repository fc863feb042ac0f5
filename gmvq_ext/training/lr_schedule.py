"""Learning-rate schedule: linear warmup from a factor, then cosine decay to 0."""

from __future__ import annotations

import math


def warmup_cosine(total_steps: int, warmup_steps: int, start_factor: float = 0.2):
    """A LambdaLR factor function of the step (0-based).

    Steps [0, warmup_steps) rise linearly from ``start_factor`` to 1; the
    remaining steps follow half a cosine from 1 to 0. When the warmup is as
    long as the run, the run is all warmup."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start_factor + (1.0 - start_factor) * step / warmup_steps
        decay_steps = total_steps - warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
