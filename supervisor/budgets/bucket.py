"""Pure token-bucket math: refill, what a take needs, and the figures OpenAI's x-ratelimit headers carry.

A bucket holds at most `capacity` (a minute's budget) and refills continuously at capacity / 60 per
second. A take needs the whole amount in the bucket (at most the capacity, so a request larger than
the budget passes on a full bucket and leaves a debt); a settlement moves the level by the difference
between what was charged and what was used, so the level may go below zero (a debt that refill pays
back before the next take). Levels are plain floats and every function takes `now`: no clock here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

PERIOD_S = 60.0  # budgets are per minute


class Level(NamedTuple):
    """One bucket's content at a moment: `level` units at time `at` (the store's clock, in seconds).
    (Immutable values on the request path are NamedTuples: a frozen dataclass costs ~1 us to make.)"""

    level: float
    at: float


def refill(level: float, at: float, capacity: float, now: float) -> float:
    """The level at `now` of a bucket that held `level` at `at`: grown by the time since, never past
    its capacity."""
    if now <= at:
        return level
    return min(capacity, level + (now - at) * capacity / PERIOD_S)


def wait_s(level: float, amount: float, capacity: float) -> float:
    """Seconds until `amount` can be taken from a bucket at `level` (0 when it can now): all of it must
    be there, but never more than a full bucket."""
    missing = min(amount, capacity) - level
    return missing * PERIOD_S / capacity if missing > 0 else 0.0


def full_in_s(level: float, capacity: float) -> float:
    """Seconds until the bucket is full again (OpenAI's `x-ratelimit-reset-*`)."""
    missing = capacity - level
    return missing * PERIOD_S / capacity if missing > 0 else 0.0


def remaining(level: float) -> int:
    """Whole units left (never negative), for `x-ratelimit-remaining-*`."""
    return max(0, math.floor(level))
