"""The usage log: gathering per (key, model, minute), periods, the /usage answer, retention, and the
memory and SQLite stores (a file in tmp_path) holding the same rows."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.budgets.store import UsageRecord
from supervisor.budgets.usage import (
    PERIODS,
    Batch,
    MemoryUsageStore,
    UsageLog,
    UsageQuery,
    UsageRow,
    UsageUnavailable,
    answer,
    batches,
    grouped,
    minute_of,
    open_usage_store,
    parse_query,
    spill,
    take_spilled,
)
from supervisor.budgets.usage_sqlite import SqliteUsageStore
from supervisor.fairness import hash_key

T0 = 1_700_000_000  # a Tuesday, 22:13:20 UTC
DAY = 86400


class Clock:
    """Wall time the test moves by hand."""

    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def rec(key: str, model: str | None, i: int, o: int, at: float) -> UsageRecord:
    return UsageRecord(key=key, name=None, model=model, input_tokens=i, output_tokens=o, at=at)


# -- pure parts ---------------------------------------------------------------------------------------

def test_minute_of() -> None:
    assert minute_of(T0) == T0 - T0 % 60
    assert minute_of(120.0) == 120
    assert minute_of(179.999) == 120


def test_parse_query_defaults_and_values() -> None:
    assert parse_query([("key", "alice")]) == UsageQuery("alice", 0.0, "minute")
    assert parse_query([("key", "a b"), ("since", "1700000000.5"), ("group_by", "day")]) == \
        UsageQuery("a b", 1700000000.5, "day")


@pytest.mark.parametrize("query, says", [
    ({}, "key is required"),
    ({"key": ""}, "key is required"),
    ({"key": "a", "since": "yesterday"}, "since='yesterday' is not a number"),
    ({"key": "a", "since": "-1"}, "must be unix seconds >= 0"),
    ({"key": "a", "since": "nan"}, "must be unix seconds >= 0"),
    ({"key": "a", "since": "inf"}, "must be unix seconds >= 0"),
    ({"key": "a", "group_by": "week"}, "group_by='week': must be one of minute, hour, day"),
    ({"key": "a", "limit": "3"}, "unknown parameter 'limit'"),
])
def test_parse_query_refuses_with_a_reason(query: dict, says: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_query(query.items())
    assert says in str(exc.value)


def test_parse_query_refuses_a_repeated_parameter() -> None:
    with pytest.raises(ValueError) as exc:
        parse_query([("key", "a"), ("key", "b")])
    assert "key is given more than once" in str(exc.value)


def test_grouped_by_period_and_model() -> None:
    h0 = T0 - T0 % 3600
    rows = [UsageRow("k", "gpt", h0, 1, 10, 5), UsageRow("k", "gpt", h0 + 60, 2, 20, 6),
            UsageRow("k", "emb", h0 + 60, 1, 7, 0), UsageRow("k", "gpt", h0 + 3600, 1, 1, 1)]
    assert grouped(rows, "minute") == [
        {"period_start": h0, "model": "gpt", "requests": 1, "input_tokens": 10, "output_tokens": 5},
        {"period_start": h0 + 60, "model": "emb", "requests": 1, "input_tokens": 7, "output_tokens": 0},
        {"period_start": h0 + 60, "model": "gpt", "requests": 2, "input_tokens": 20, "output_tokens": 6},
        {"period_start": h0 + 3600, "model": "gpt", "requests": 1, "input_tokens": 1, "output_tokens": 1},
    ]
    assert grouped(rows, "hour") == [
        {"period_start": h0, "model": "emb", "requests": 1, "input_tokens": 7, "output_tokens": 0},
        {"period_start": h0, "model": "gpt", "requests": 3, "input_tokens": 30, "output_tokens": 11},
        {"period_start": h0 + 3600, "model": "gpt", "requests": 1, "input_tokens": 1, "output_tokens": 1},
    ]
    d0 = T0 - T0 % DAY
    assert [r["period_start"] for r in grouped(rows, "day")] == [d0, d0]


def test_answer_has_designs_shape() -> None:
    m = minute_of(T0)
    out = answer(UsageQuery("alice", 1700000000.0, "minute"), [UsageRow(hash_key("alice"), "gpt", m, 2, 30, 12)])
    assert out == {"key": "alice", "since": 1700000000, "group_by": "minute",
                   "rows": [{"period_start": m, "model": "gpt", "requests": 2, "input_tokens": 30,
                             "output_tokens": 12}],
                   "total": {"requests": 2, "input_tokens": 30, "output_tokens": 12}}
    empty = answer(UsageQuery("bob", 12.5, "day"), [])
    assert empty == {"key": "bob", "since": 12.5, "group_by": "day", "rows": [],
                     "total": {"requests": 0, "input_tokens": 0, "output_tokens": 0}}


def test_batches_cut_rows_with_fresh_ids() -> None:
    counts = {(f"k{i}", "m", 60 * i): [1, i, 0] for i in range(7)}
    out = batches(counts, size=3)
    assert [len(b.rows) for b in out] == [3, 3, 1]
    assert len({b.id for b in out}) == 3
    assert sorted(r.input_tokens for b in out for r in b.rows) == list(range(7))


# -- the log over its stores --------------------------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite"])
async def store(request, tmp_path: Path):
    s = MemoryUsageStore() if request.param == "memory" else SqliteUsageStore(str(tmp_path / "d" / "usage.db"))
    await s.open()
    yield s
    await s.close()


async def test_records_gather_per_key_model_minute(store) -> None:
    clock = Clock()
    log = UsageLog(store, retention_s=DAY, clock=clock)
    alice, bob = hash_key("alice"), hash_key("bob")
    log.record(rec(alice, "gpt", 10, 5, clock.t))
    log.record(rec(alice, "gpt", 3, 4, clock.t))
    log.record(rec(alice, "emb", 8, 0, clock.t))
    log.record(rec(bob, "gpt", 1, 1, clock.t))
    clock.t += 60
    log.record(rec(alice, "gpt", 1, 2, clock.t))
    assert log.unwritten() == (4, 0)       # alice gpt twice in one minute: one row
    rows = await log.query(alice, 0)
    assert log.unwritten() == (0, 0)
    m = minute_of(T0)
    assert sorted(rows, key=lambda r: (r.minute, r.model)) == [
        UsageRow(alice, "emb", m, 1, 8, 0), UsageRow(alice, "gpt", m, 2, 13, 9),
        UsageRow(alice, "gpt", m + 60, 1, 1, 2)]
    assert await log.query(alice, T0 + 60) == [UsageRow(alice, "gpt", m + 60, 1, 1, 2)]
    assert await log.query(bob, 0) == [UsageRow(bob, "gpt", m, 1, 1, 1)]
    assert await log.query(hash_key("carol"), 0) == []


async def test_flushes_add_to_what_is_stored(store) -> None:
    clock = Clock()
    log = UsageLog(store, retention_s=DAY, clock=clock)
    k = hash_key("k")
    for _ in range(3):
        log.record(rec(k, "gpt", 2, 3, clock.t))
        assert await log.flush()
    assert await log.query(k, 0) == [UsageRow(k, "gpt", minute_of(T0), 3, 6, 9)]


async def test_retention_prunes_old_minutes(store) -> None:
    clock = Clock()
    log = UsageLog(store, retention_s=3600, clock=clock)
    k = hash_key("k")
    log.record(rec(k, "gpt", 1, 1, clock.t))
    clock.t += 1800
    log.record(rec(k, "gpt", 2, 2, clock.t))
    assert await log.flush()
    clock.t += 1900                       # the first minute is now past retention, the second is not
    assert await log.prune() == 1
    assert await log.query(k, 0) == [UsageRow(k, "gpt", minute_of(T0 + 1800), 1, 2, 2)]


async def test_negative_or_odd_token_counts_count_the_request_only(store) -> None:
    clock = Clock()
    log = UsageLog(store, retention_s=DAY, clock=clock)
    k = hash_key("k")
    log.record(rec(k, "gpt", -5, 0, clock.t))
    assert await log.query(k, 0) == [UsageRow(k, "gpt", minute_of(T0), 1, 0, 0)]


async def test_sqlite_applies_a_batch_once(tmp_path: Path) -> None:
    s = SqliteUsageStore(str(tmp_path / "u.db"))
    await s.open()
    b = Batch("b1", (UsageRow("k", "gpt", 60, 1, 2, 3),))
    await s.apply(b, DAY, T0)
    await s.apply(b, DAY, T0)             # a retry of a write whose answer was lost
    await s.apply(Batch("b2", b.rows), DAY, T0)
    assert await s.rows("k", 0) == [UsageRow("k", "gpt", 60, 2, 4, 6)]
    await s.close()


async def test_sqlite_rows_survive_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "u.db")
    clock = Clock()
    log = UsageLog(SqliteUsageStore(path), DAY, clock=clock)
    await log.store.open()
    log.record(rec("k", "gpt", 4, 5, clock.t))
    await log.aclose()                     # the last flush is at shutdown
    again = SqliteUsageStore(path)
    await again.open()
    assert await again.rows("k", 0) == [UsageRow("k", "gpt", minute_of(T0), 1, 4, 5)]
    await again.close()


async def test_sqlite_store_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    bad = tmp_path / "u.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    s = SqliteUsageStore(str(bad))
    with pytest.raises(UsageUnavailable) as exc:
        await s.open()
    assert str(bad) in str(exc.value)
    await s.close()


async def test_sqlite_write_refused_keeps_the_counts_for_later(tmp_path: Path) -> None:
    """A store that refuses writes (the file locked by another process) loses nothing: the batch is
    written, once, when the store takes writes again."""
    path = str(tmp_path / "u.db")
    store = SqliteUsageStore(path, busy_timeout_s=0)
    await store.open()
    clock = Clock()
    log = UsageLog(store, DAY, clock=clock)
    k = hash_key("k")
    log.record(rec(k, "gpt", 1, 1, clock.t))
    assert await log.flush()
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        log.record(rec(k, "gpt", 2, 2, clock.t))
        assert not await log.flush()
        log.record(rec(k, "emb", 3, 3, clock.t))
        assert not await log.flush()
        assert log.unwritten() == (1, 1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert await log.flush()
    assert sorted(await log.query(k, 0), key=lambda r: r.model) == [
        UsageRow(k, "emb", minute_of(T0), 1, 3, 3), UsageRow(k, "gpt", minute_of(T0), 2, 3, 3)]
    await log.aclose()


def test_spilled_batches_come_back_as_they_were(tmp_path: Path) -> None:
    left = [Batch("b1", (UsageRow("k", "gpt", 60, 1, 2, 3), UsageRow("k", "", 120, 1, 0, 0))),
            Batch("b2", (UsageRow("j", "emb", 60, 4, 5, 6),))]
    path = spill(str(tmp_path / "state"), left)
    assert Path(path).name.startswith("usage-unwritten-") and (Path(path).stat().st_mode & 0o777) == 0o600
    (tmp_path / "state" / "usage-unwritten-broken.json").write_text("{not json")
    assert take_spilled(str(tmp_path / "state")) == left
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["usage-unwritten-broken.json.bad"]
    assert take_spilled(str(tmp_path / "state")) == []
    assert take_spilled(str(tmp_path / "nowhere")) == []


async def test_a_shutdown_with_the_store_down_leaves_usage_for_the_next_start(tmp_path: Path) -> None:
    path, state = str(tmp_path / "u.db"), str(tmp_path / "state")
    clock = Clock()
    first = UsageLog(SqliteUsageStore(path, busy_timeout_s=0), DAY, clock=clock, spill_dir=state)
    await first.store.open()
    first.record(rec("k", "gpt", 1, 1, clock.t))
    assert await first.flush()
    first.record(rec("k", "gpt", 2, 2, clock.t))
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        assert not await first.flush()            # the batch is tried: it may count on a retry only once
        first.record(rec("k", "emb", 3, 3, clock.t))
        await first.aclose()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    second = UsageLog(SqliteUsageStore(path), DAY, clock=clock, spill_dir=state)
    await second.store.open()
    assert await second.take_spilled() == 2
    assert sorted(await second.query("k", 0), key=lambda r: r.model) == [
        UsageRow("k", "emb", minute_of(T0), 1, 3, 3), UsageRow("k", "gpt", minute_of(T0), 2, 3, 3)]
    assert not any(Path(state).iterdir())
    await second.aclose()


def test_open_usage_store_by_name(tmp_path: Path) -> None:
    assert open_usage_store("memory").kind == "memory"
    assert open_usage_store(f"sqlite://{tmp_path}/u.db").kind == "sqlite"
    assert open_usage_store("redis://127.0.0.1:6379/0").kind == "redis"
    with pytest.raises(ValueError):
        open_usage_store("postgres://x/y")


# -- properties ---------------------------------------------------------------------------------------

records = st.lists(st.tuples(st.sampled_from(["alice", "bob"]), st.sampled_from(["gpt", "emb"]),
                             st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 3 * DAY)),
                   max_size=60)


@settings(max_examples=60, deadline=None)
@given(records, st.sampled_from(list(PERIODS)), st.integers(0, 3 * DAY))
async def test_any_period_totals_what_was_recorded_since(recs, group_by: str, since_offset: int) -> None:
    log = UsageLog(MemoryUsageStore(), retention_s=7 * DAY, clock=Clock())
    for who, model, i, o, dt in recs:
        log.record(rec(hash_key(who), model, i, o, T0 + dt))
    since = T0 + since_offset
    out = answer(UsageQuery("alice", since, group_by), await log.query(hash_key("alice"), since))
    mine = [(i, o) for who, _m, i, o, dt in recs if who == "alice" and minute_of(T0 + dt) >= minute_of(since)]
    assert out["total"] == {"requests": len(mine), "input_tokens": sum(i for i, _ in mine),
                            "output_tokens": sum(o for _, o in mine)}
    size = PERIODS[group_by]
    starts = [r["period_start"] for r in out["rows"]]
    assert all(s % size == 0 for s in starts)
    assert [(r["period_start"], r["model"]) for r in out["rows"]] == \
        sorted({(r["period_start"], r["model"]) for r in out["rows"]})       # one row each, in order
    assert sum(r["requests"] for r in out["rows"]) == len(mine)


async def test_a_request_without_a_model_is_counted_under_null() -> None:
    clock = Clock()
    log = UsageLog(MemoryUsageStore(), retention_s=DAY, clock=clock)
    log.record(rec("k", None, 1, 2, clock.t))
    out = answer(UsageQuery("k", 0, "hour"), await log.query("k", 0))
    assert [(r["model"], r["requests"]) for r in out["rows"]] == [(None, 1)]


# -- the command line's pure parts ----------------------------------------------------------------------

def test_cli_since_takes_unix_seconds_or_a_time_ago() -> None:
    from supervisor.usage_cli import UsageError, parse_since
    assert parse_since(None, T0) is None
    assert parse_since("1700000000", T0) == 1700000000.0
    assert parse_since("90m", T0) == T0 - 5400
    assert parse_since("7d", T0) == T0 - 7 * DAY
    assert parse_since("1.5h", 100.0) == 0.0                  # never before the epoch
    for bad in ("yesterday", "-5", "nan", "3w"):
        with pytest.raises(UsageError) as exc:
            parse_since(bad, T0)
        assert exc.value.line().startswith(f"gpu-supervisor usage: --since {bad!r}")


def test_cli_target_is_the_base_url_with_usage_and_the_query() -> None:
    from supervisor.usage_cli import UsageError, usage_target
    t = usage_target("http://127.0.0.1:9000", "a b&c", 1700000000.0, "hour")
    assert (t.host, t.port, t.path) == ("127.0.0.1", 9000, "/usage?key=a+b%26c&group_by=hour&since=1700000000")
    assert t.shown == "http://127.0.0.1:9000/usage"
    t = usage_target("https://gw.example/sup/", "k", None, "day")
    assert (t.scheme, t.port, t.path) == ("https", 443, "/sup/usage?key=k&group_by=day")
    with pytest.raises(UsageError):
        usage_target("ftp://x", "k", None, "day")


def test_cli_parses_and_shows_a_usage_answer() -> None:
    from rich.console import Console

    from supervisor.usage_cli import UsageError, parse_usage, render
    h0 = T0 - T0 % 3600
    data = answer(UsageQuery("alice", 0, "hour"), [UsageRow("k", "gpt", h0, 2, 30, 12),
                                                   UsageRow("k", "", h0 + 3600, 1, 5, 0)])
    assert parse_usage(json.dumps(data).encode()) == data
    console = Console(record=True, width=120, color_system=None)
    console.print(render(data, "http://h:1/usage"))
    text = console.export_text()
    assert "usage of alice by hour (UTC)" in text
    assert "2023-11-14 22:00" in text and "2023-11-14 23:00" in text      # T0's hour and the next, UTC
    lines = [line for line in text.splitlines() if "gpt" in line or "total" in line]
    assert [[c for c in line.split() if c.isdigit()][-3:] for line in lines] == [["2", "30", "12"], ["3", "35", "12"]]
    for body in (b"<html>", b"[]", b'{"rows": 1, "total": {}}', b'{"rows": [1], "total": {}}'):
        with pytest.raises(UsageError):
            parse_usage(body)
