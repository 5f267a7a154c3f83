"""Memory-pressure decisions: levels from ratios, actions from levels, recycle and fallback triggers.

Pure functions of plain values: no clock (callers pass `now`), no I/O, no logging.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from supervisor.config import Actions, Recycle, Thresholds

MIB = 1024 * 1024


class Level(enum.IntEnum):
    OK = 0
    SOFT = 1
    HARD = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        """The lowercase name used in /status, logs and config keys."""
        return self.name.lower()


def _threshold(thresholds: Thresholds, level: Level) -> float:
    if level is Level.SOFT:
        return thresholds.soft
    if level is Level.HARD:
        return thresholds.hard
    if level is Level.CRITICAL:
        return thresholds.critical
    return 0.0


def raw_level(ratio: float, thresholds: Thresholds) -> Level:
    """The level of `ratio` with no memory of the past: the highest threshold it reaches."""
    if ratio >= thresholds.critical:
        return Level.CRITICAL
    if ratio >= thresholds.hard:
        return Level.HARD
    if ratio >= thresholds.soft:
        return Level.SOFT
    return Level.OK


def level_for(ratio: float, thresholds: Thresholds, previous: Level, hysteresis: float) -> Level:
    """The level of one used/total ratio, given the level held before.

    Rising is immediate. Falling leaves a level only once the ratio is more than `hysteresis`
    below that level's threshold, one level at a time, so a ratio that wobbles around a
    threshold does not flap (0.86 -> SOFT holds down to 0.83 with soft=0.85, hysteresis=0.02).
    """
    raw = raw_level(ratio, thresholds)
    level = Level(previous)
    while level > raw and ratio < _threshold(thresholds, level) - hysteresis:
        level = Level(level - 1)
    return max(level, raw)


def combined_level(
    gpu_ratios: Iterable[float],
    host_ratio: float | None,
    gpu_thr: Thresholds,
    host_thr: Thresholds,
    previous: Level,
    hysteresis: float,
) -> Level:
    """The worst level over every GPU's ratio and the host's (None: no host reading).

    Each ratio is judged against the one level held before, so the level falls only when every
    source has dropped `hysteresis` below that level's threshold.
    """
    level = Level.OK
    for ratio in gpu_ratios:
        level = max(level, level_for(ratio, gpu_thr, previous, hysteresis))
    if host_ratio is not None:
        level = max(level, level_for(host_ratio, host_thr, previous, hysteresis))
    return level


def sheds(priority_index: int, shed_below_index: int | None) -> bool:
    """Whether a request of `priority_index` is shed (indices count from the highest priority, 0)."""
    return shed_below_index is not None and priority_index > shed_below_index


@dataclass(frozen=True, slots=True)
class Decision:
    """What the supervisor does at one pressure level; `critical_since` is the state to carry on."""

    level: Level = Level.OK
    shed_below: str | None = None          # shed priorities strictly lower than this name
    shed_below_index: int | None = None    # the same as an index into queue.priorities
    concurrency_cap: int | None = None     # lower the default pool's slots to this
    pause: bool = False                    # hold the queue: dispatch nothing
    cleanup: bool = False                  # call the worker's POST /cleanup (once, on entering hard)
    restart: bool = False                  # restart the worker, reason `pressure`
    critical_since: float | None = None    # monotonic time critical began (pass to the next decide)

    def sheds(self, priority_index: int) -> bool:
        return sheds(priority_index, self.shed_below_index)


CALM = Decision()


def decide(
    level: Level,
    actions: Actions,
    priorities: Sequence[str],
    now: float,
    critical_since: float | None,
    *,
    previous: Level = Level.OK,
) -> Decision:
    """The actions for `level` (`previous`: the level of the last decision, for the one-shot cleanup).

    A level's settings also hold at the levels above it, and the strictest shedding wins.
    A restart fires once critical has held `restart_after_s`; the clock then starts again, so a
    worker that comes back into critical pressure is restarted again only after another full period.
    """
    if level is Level.OK:
        return CALM
    stages = [actions.soft, actions.hard, actions.critical][: int(level)]
    shed_index: int | None = None
    for stage in stages:
        if stage.shed_below is not None:
            idx = priorities.index(stage.shed_below)
            shed_index = idx if shed_index is None else min(shed_index, idx)

    restart = False
    since: float | None = None
    if level is Level.CRITICAL:
        since = now if critical_since is None else critical_since
        after = actions.critical.restart_after_s
        if after is not None and now - since >= after:
            restart = True
            since = now
    return Decision(
        level=level,
        shed_below=priorities[shed_index] if shed_index is not None else None,
        shed_below_index=shed_index,
        concurrency_cap=actions.soft.concurrency,
        pause=level >= Level.HARD and actions.hard.pause,
        cleanup=level >= Level.HARD and previous < Level.HARD and actions.hard.cleanup,
        restart=restart,
        critical_since=since,
    )


def recycle_due(requests_served: int, max_requests: int, jitter_value: int) -> bool:
    """gunicorn-style recycle: after `max_requests` plus this worker's drawn jitter (0 = off)."""
    return max_requests > 0 and requests_served >= max_requests + jitter_value


def leak_due(rss_bytes: int | None, gpu_bytes: int | None, recycle: Recycle) -> str | None:
    """The recycle reason ("rss" or "gpu_memory") when the worker passed a memory limit, else None."""
    if recycle.max_rss_mb and rss_bytes is not None and rss_bytes > recycle.max_rss_mb * MIB:
        return "rss"
    if recycle.max_gpu_memory_mb and gpu_bytes is not None and gpu_bytes > recycle.max_gpu_memory_mb * MIB:
        return "gpu_memory"
    return None


def fallback_due(oom_restarts: int, cpu_after_oom_restarts: int) -> bool:
    """Whether the next spawn should use `fallback.env` (0 = never)."""
    return cpu_after_oom_restarts > 0 and oom_restarts >= cpu_after_oom_restarts
