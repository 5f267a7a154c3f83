"""Pressure levels, actions and recycle/fallback triggers, with plain values (no clock, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from supervisor.config import Actions, CriticalAction, HardAction, Recycle, SoftAction, Thresholds
from supervisor.pressure import (
    CALM,
    Level,
    combined_level,
    decide,
    fallback_due,
    leak_due,
    level_for,
    raw_level,
    recycle_due,
    sheds,
)

GPU = Thresholds()                                         # 0.85 / 0.93 / 0.97
HOST = Thresholds(soft=0.90, hard=0.95, critical=0.98)
H = 0.02
PRIOS = ("critical", "high", "normal", "low")
MIB = 1024 * 1024


# ---- level_for ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("ratio", "level"),
    [(0.0, Level.OK), (0.8499, Level.OK), (0.85, Level.SOFT), (0.9299, Level.SOFT),
     (0.93, Level.HARD), (0.97, Level.CRITICAL), (1.0, Level.CRITICAL)],
)
def test_rising_is_immediate(ratio: float, level: Level) -> None:
    assert level_for(ratio, GPU, Level.OK, H) is level


def test_falling_waits_for_the_hysteresis() -> None:
    assert level_for(0.86, GPU, Level.OK, H) is Level.SOFT
    assert level_for(0.84, GPU, Level.SOFT, H) is Level.SOFT
    assert level_for(0.8301, GPU, Level.SOFT, H) is Level.SOFT
    assert level_for(0.829, GPU, Level.SOFT, H) is Level.OK


def test_falling_steps_down_through_each_band() -> None:
    assert level_for(0.96, GPU, Level.CRITICAL, H) is Level.CRITICAL   # within 0.02 of 0.97
    assert level_for(0.94, GPU, Level.CRITICAL, H) is Level.HARD
    assert level_for(0.92, GPU, Level.CRITICAL, H) is Level.HARD       # within 0.02 of hard
    assert level_for(0.90, GPU, Level.CRITICAL, H) is Level.SOFT
    assert level_for(0.50, GPU, Level.CRITICAL, H) is Level.OK


def test_no_hysteresis_is_the_raw_level() -> None:
    for r in (0.1, 0.849, 0.85, 0.95, 0.99):
        for prev in Level:
            assert level_for(r, GPU, prev, 0.0) is raw_level(r, GPU)


def test_combined_is_the_worst_source() -> None:
    assert combined_level([], None, GPU, HOST, Level.OK, H) is Level.OK
    assert combined_level([0.5, 0.94], 0.5, GPU, HOST, Level.OK, H) is Level.HARD
    assert combined_level([0.5], 0.985, GPU, HOST, Level.OK, H) is Level.CRITICAL
    assert combined_level([], 0.91, GPU, HOST, Level.OK, H) is Level.SOFT       # no GPU: host alone
    # The level falls only once every source has left the band of the level held.
    assert combined_level([0.5], 0.94, GPU, HOST, Level.HARD, H) is Level.HARD
    assert combined_level([0.5], 0.92, GPU, HOST, Level.HARD, H) is Level.SOFT
    assert combined_level([0.92], 0.5, GPU, HOST, Level.HARD, H) is Level.HARD


# ---- properties --------------------------------------------------------------------------------

@st.composite
def thresholds(draw: st.DrawFn, min_gap: float = 0.001) -> Thresholds:
    """Valid thresholds at least `min_gap` apart (gap <= 0.25)."""
    soft = draw(st.floats(0.05, 0.45))
    hard = soft + min_gap + draw(st.floats(0.0, 1.0)) * (0.95 - soft - 2 * min_gap) / 2
    critical = min(1.0, hard + min_gap + draw(st.floats(0.0, 1.0)) * (1.0 - hard - min_gap))
    assume(hard - soft >= min_gap and critical - hard >= min_gap)
    return Thresholds(soft=soft, hard=hard, critical=critical)


ratios = st.floats(0.0, 1.0, allow_nan=False)
hysteresis = st.floats(0.0, 0.2)


def _walk(values: list[float], thr: Thresholds, start: Level, h: float) -> list[Level]:
    levels, level = [], start
    for r in values:
        level = level_for(r, thr, level, h)
        levels.append(level)
    return levels


@given(thresholds(), st.lists(ratios, min_size=1, max_size=30), hysteresis)
def test_levels_are_monotone_in_a_rising_ratio(thr: Thresholds, values: list[float], h: float) -> None:
    levels = _walk(sorted(values), thr, Level.OK, h)
    assert levels == sorted(levels)


@given(thresholds(), ratios, ratios, st.sampled_from(list(Level)), hysteresis)
def test_level_is_monotone_in_the_ratio(thr: Thresholds, a: float, b: float, prev: Level, h: float) -> None:
    lo, hi = sorted((a, b))
    assert level_for(lo, thr, prev, h) <= level_for(hi, thr, prev, h)


@given(thresholds(), st.floats(0.001, 0.2), st.sampled_from(list(Level)), st.data())
def test_a_ratio_within_one_band_never_flaps(
    thr: Thresholds, h: float, start: Level, data: st.DataObject
) -> None:
    # Every ratio lies within one hysteresis band (placed near a threshold, where flapping would
    # happen): a level entered is never left in the other direction, so the sequence never goes
    # up then down, or down then up.
    t = data.draw(st.sampled_from([thr.soft, thr.hard, thr.critical]))
    lo = data.draw(st.floats(max(0.0, t - 2 * h), min(1.0, t + h)))
    offsets = data.draw(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=40))
    values = [min(1.0, lo + o * h * 0.999) for o in offsets]
    levels = _walk(values, thr, start, h)
    steps = [b - a for a, b in zip([start, *levels], levels) if b != a]
    assert all(s > 0 for s in steps) or all(s < 0 for s in steps)


@given(st.floats(0.001, 0.1), st.data())
def test_a_band_around_one_threshold_changes_level_at_most_once(h: float, data: st.DataObject) -> None:
    thr = data.draw(thresholds(min_gap=h * 1.01))
    t = data.draw(st.sampled_from([thr.soft, thr.hard, thr.critical]))
    lo = data.draw(st.floats(max(0.0, t - h), t))
    offsets = data.draw(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=40))
    values = [min(1.0, lo + o * h * 0.999) for o in offsets]
    levels = _walk(values, thr, raw_level(values[0], thr), h)
    changes = sum(1 for a, b in zip(levels, levels[1:]) if a != b)
    assert changes <= 1


@given(thresholds(), st.lists(ratios, max_size=4), st.one_of(st.none(), ratios),
       st.sampled_from(list(Level)), hysteresis)
def test_combined_is_the_max_of_its_parts(
    thr: Thresholds, gpus: list[float], host: float | None, prev: Level, h: float
) -> None:
    parts = [level_for(r, thr, prev, h) for r in gpus]
    if host is not None:
        parts.append(level_for(host, HOST, prev, h))
    assert combined_level(gpus, host, thr, HOST, prev, h) == max(parts, default=Level.OK)


# ---- decide ------------------------------------------------------------------------------------

def test_ok_does_nothing() -> None:
    d = decide(Level.OK, Actions(), PRIOS, now=5.0, critical_since=3.0)
    assert d == CALM
    assert d.critical_since is None and not d.sheds(3)


def test_soft_sheds_below_its_level() -> None:
    d = decide(Level.SOFT, Actions(), PRIOS, now=0.0, critical_since=None)
    assert (d.shed_below, d.shed_below_index) == ("high", 1)
    assert [d.sheds(i) for i in range(4)] == [False, False, True, True]
    assert not d.pause and not d.cleanup and not d.restart
    assert d.concurrency_cap is None


def test_soft_concurrency_cap_holds_above_soft() -> None:
    actions = Actions(soft=SoftAction(shed_below=None, concurrency=1))
    for level in (Level.SOFT, Level.HARD, Level.CRITICAL):
        assert decide(level, actions, PRIOS, 0.0, None).concurrency_cap == 1


def test_hard_pauses_and_cleans_up_once_on_entering() -> None:
    entering = decide(Level.HARD, Actions(), PRIOS, 0.0, None, previous=Level.SOFT)
    assert entering.pause and entering.cleanup
    assert entering.shed_below == "high"          # soft's shedding still holds
    staying = decide(Level.HARD, Actions(), PRIOS, 1.0, None, previous=Level.HARD)
    assert staying.pause and not staying.cleanup
    from_critical = decide(Level.HARD, Actions(), PRIOS, 1.0, None, previous=Level.CRITICAL)
    assert not from_critical.cleanup
    straight_to_critical = decide(Level.CRITICAL, Actions(), PRIOS, 0.0, None, previous=Level.OK)
    assert straight_to_critical.pause and straight_to_critical.cleanup


def test_hard_actions_can_be_off() -> None:
    actions = Actions(hard=HardAction(pause=False, cleanup=False))
    d = decide(Level.HARD, actions, PRIOS, 0.0, None)
    assert not d.pause and not d.cleanup


@pytest.mark.parametrize(
    ("soft", "hard", "critical", "expect"),
    [
        ("high", "critical", None, {Level.SOFT: "high", Level.HARD: "critical", Level.CRITICAL: "critical"}),
        ("high", "low", None, {Level.SOFT: "high", Level.HARD: "high", Level.CRITICAL: "high"}),
        (None, "normal", "critical", {Level.SOFT: None, Level.HARD: "normal", Level.CRITICAL: "critical"}),
        (None, None, None, {Level.SOFT: None, Level.HARD: None, Level.CRITICAL: None}),
    ],
)
def test_the_strictest_shedding_of_the_active_levels_applies(
    soft: str | None, hard: str | None, critical: str | None, expect: dict[Level, str | None]
) -> None:
    actions = Actions(soft=SoftAction(shed_below=soft), hard=HardAction(shed_below=hard),
                      critical=CriticalAction(shed_below=critical))
    for level, name in expect.items():
        d = decide(level, actions, PRIOS, 0.0, None)
        assert d.shed_below == name
        assert d.shed_below_index == (PRIOS.index(name) if name else None)


def test_critical_restarts_after_holding_and_the_clock_starts_again() -> None:
    a = Actions()   # restart_after_s: 10
    d = decide(Level.CRITICAL, a, PRIOS, now=100.0, critical_since=None)
    assert d.critical_since == 100.0 and not d.restart
    d = decide(Level.CRITICAL, a, PRIOS, now=109.9, critical_since=d.critical_since)
    assert d.critical_since == 100.0 and not d.restart
    d = decide(Level.CRITICAL, a, PRIOS, now=110.0, critical_since=d.critical_since)
    assert d.restart and d.critical_since == 110.0
    d = decide(Level.CRITICAL, a, PRIOS, now=115.0, critical_since=d.critical_since)
    assert not d.restart
    # Leaving critical forgets the start: the next critical period is timed from scratch.
    d = decide(Level.HARD, a, PRIOS, now=116.0, critical_since=d.critical_since)
    assert d.critical_since is None and not d.restart
    d = decide(Level.CRITICAL, a, PRIOS, now=117.0, critical_since=d.critical_since)
    assert d.critical_since == 117.0 and not d.restart


def test_critical_restart_off_and_immediate() -> None:
    never = Actions(critical=CriticalAction(restart_after_s=None))
    d = decide(Level.CRITICAL, never, PRIOS, now=1e6, critical_since=0.0)
    assert not d.restart and d.critical_since == 0.0
    at_once = Actions(critical=CriticalAction(restart_after_s=0))
    assert decide(Level.CRITICAL, at_once, PRIOS, now=1.0, critical_since=None).restart


def test_sheds() -> None:
    assert not sheds(3, None)
    assert sheds(2, 1) and not sheds(1, 1) and not sheds(0, 1)
    assert not sheds(0, 0) and sheds(1, 0)


# ---- recycle and fallback ----------------------------------------------------------------------

def test_recycle_due() -> None:
    assert not recycle_due(10**9, 0, 0)            # off
    assert not recycle_due(99, 100, 0)
    assert recycle_due(100, 100, 0)
    assert not recycle_due(104, 100, 5)            # this worker's jitter pushes it later
    assert recycle_due(105, 100, 5)


def test_leak_due() -> None:
    off = Recycle()
    assert leak_due(10**12, 10**12, off) is None
    r = Recycle(max_rss_mb=100, max_gpu_memory_mb=200)
    assert leak_due(100 * MIB, 200 * MIB, r) is None              # at the limit is not past it
    assert leak_due(100 * MIB + 1, 0, r) == "rss"
    assert leak_due(0, 200 * MIB + 1, r) == "gpu_memory"
    assert leak_due(100 * MIB + 1, 200 * MIB + 1, r) == "rss"
    assert leak_due(None, None, r) is None                         # nothing measured
    assert leak_due(None, 300 * MIB, Recycle(max_gpu_memory_mb=200)) == "gpu_memory"


def test_fallback_due() -> None:
    assert not fallback_due(100, 0)
    assert not fallback_due(1, 2)
    assert fallback_due(2, 2) and fallback_due(3, 2)


def test_level_labels() -> None:
    assert [lv.label for lv in Level] == ["ok", "soft", "hard", "critical"]
