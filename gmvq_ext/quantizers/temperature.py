"""Temperature schedules for the Gumbel-softmax based quantizers."""

from __future__ import annotations

import math


def exponential_temperature(step: int, total_steps: int, start: float = 2.0, end: float = 0.1) -> float:
    """tau_t = max(end, start * exp(-r t)) with r = ln(start / end) / total_steps.

    With the defaults this is docs/math.md's max(0.1, 2 exp(-r t)), r = ln(20) / T:
    tau falls from 2.0 at step 0 to 0.1 at the last step and stays there.
    start == end gives a constant temperature."""
    if not (start > 0 and end > 0 and math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"temperatures must be positive and finite, got start={start}, end={end}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if start < end:
        raise ValueError(f"the temperature must not rise: start={start} < end={end}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    rate = math.log(start / end) / total_steps
    return max(end, start * math.exp(-rate * step))
