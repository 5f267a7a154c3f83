"""Pure token-bucket math: refill, take, settle, and the figures OpenAI's x-ratelimit headers carry.

A bucket holds at most `capacity` (a minute's budget) and refills continuously at capacity / 60 per
second. A take needs the whole estimate in the bucket (at most the capacity, so a request larger than
the budget passes on a full bucket and leaves a debt); a settlement moves the level by the difference
between what was charged and what was used, so the level may go below zero (a debt that refill pays
back before the next take). Every function takes `now` and returns new values: no clock in here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PERIOD_S = 60.0  # budgets are per minute


@dataclass(frozen=True, slots=True)
class Level:
    """One bucket's content at a moment: `level` units at time `at` (the store's clock, in seconds)."""

    level: float
    at: float


def rate(capacity: float) -> float:
    """Units a bucket of this per-minute capacity gains per second."""
    return capacity / PERIOD_S


def refill(b: Level, capacity: float, now: float) -> Level:
    """The bucket at `now`: grown by the time since `b.at`, never past its capacity."""
    if now <= b.at:
        return b
    return Level(min(float(capacity), b.level + (now - b.at) * rate(capacity)), now)


def need(amount: float, capacity: float) -> float:
    """What must be in the bucket to take `amount`: all of it, but never more than a full bucket."""
    return min(float(amount), float(capacity))


def wait_s(b: Level, amount: float, capacity: float) -> float:
    """Seconds from `b.at` until `amount` can be taken (0 when it can now)."""
    missing = need(amount, capacity) - b.level
    return missing / rate(capacity) if missing > 0 else 0.0


def full_in_s(b: Level, capacity: float) -> float:
    """Seconds from `b.at` until the bucket is full again (OpenAI's `x-ratelimit-reset-*`)."""
    missing = capacity - b.level
    return missing / rate(capacity) if missing > 0 else 0.0


def remaining(b: Level) -> int:
    """Whole units left now (never negative), for `x-ratelimit-remaining-*`."""
    return max(0, math.floor(b.level))
