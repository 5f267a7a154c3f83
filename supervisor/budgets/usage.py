"""The usage log: every answered request's settled tokens, per hashed client key, model and minute.

Recording is a dict update on the event loop (no I/O, nothing awaited); the counts gathered per (key,
model, minute) go to the store `clients.store` names in batches, every FLUSH_INTERVAL_S, before a
query and at shutdown. A batch carries an id that the store applies at most once, and a batch whose
write failed is kept and written again with the same id: a store that is down (Redis) loses nothing,
and a write whose answer was lost (applied or not, we cannot tell) is not counted twice. What is still
unwritten at shutdown (the store is down) goes to a file in the state directory, and the next start
takes it back, batch ids and all. Rows older than `clients.retention_s` are pruned. `/usage` answers
are made here from the stored minute rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from .store import UsageRecord

log = structlog.get_logger("supervisor.budgets.usage")

MINUTE_S = 60
PERIODS: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400}   # periods are UTC, from the epoch
FLUSH_INTERVAL_S = 5.0
PRUNE_INTERVAL_S = 60.0
BATCH_ROWS = 256             # rows per batch: one store transaction (one Lua call on Redis) each
SPILL_PREFIX = "usage-unwritten-"   # {state_dir}/usage-unwritten-<id>.json: batches left at a shutdown


class UsageUnavailable(Exception):
    """The usage store cannot be reached or written now; what was recorded is kept and written later."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One client's answered requests and their tokens for one model in one minute."""

    key: str               # the hashed client key (supervisor.fairness.hash_key)
    model: str             # "" when the request named none
    minute: int            # the minute's start, unix seconds (a multiple of 60)
    requests: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows written together; `id` makes writing them again a no-op."""

    id: str
    rows: tuple[UsageRow, ...]


class UsageStore(Protocol):
    """Where minute rows are kept: memory, SQLite or Redis. Every method raises UsageUnavailable when
    the store cannot be used now."""

    kind: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, batch: Batch, retention_s: float, now: float) -> None:
        """Add the batch's counts to the stored rows, unless a batch with this id was applied before."""
        ...

    async def rows(self, key: str, since_minute: int) -> list[UsageRow]:
        """The rows of hashed key `key` from minute `since_minute` on."""
        ...

    async def prune(self, before_minute: int) -> int:
        """Drop rows of minutes before `before_minute`; how many went (where the store can tell)."""
        ...


# -- pure parts ---------------------------------------------------------------------------------------
def minute_of(t: float) -> int:
    """The start of the minute holding unix time `t`."""
    return int(t // MINUTE_S) * MINUTE_S


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A checked `/usage` query: the clear key, since (unix s, as given) and the period."""

    key: str
    since: float
    group_by: str


def parse_query(pairs: Iterable[tuple[str, str]]) -> UsageQuery:
    """The query's (name, value) pairs checked: `key` (required), `since` (unix seconds, default 0: all
    that is kept), `group_by` (minute, hour or day; default minute), each at most once. ValueError
    saying what is wrong and what is accepted."""
    query: dict[str, str] = {}
    for name, value in pairs:
        if name not in ("key", "since", "group_by"):
            raise ValueError(f"unknown parameter {name!r}; /usage takes key, since and group_by")
        if name in query:
            raise ValueError(f"{name} is given more than once")
        query[name] = value
    key = query.get("key")
    if not key:
        raise ValueError("key is required: /usage?key=<the client's key value, as the client sends it>")
    raw_since = query.get("since", "0")
    try:
        since = float(raw_since)
    except ValueError:
        raise ValueError(f"since={raw_since!r} is not a number: give unix seconds, e.g. since=1700000000") from None
    if not math.isfinite(since) or since < 0:
        raise ValueError(f"since={raw_since!r}: must be unix seconds >= 0")
    group_by = query.get("group_by", "minute")
    if group_by not in PERIODS:
        raise ValueError(f"group_by={group_by!r}: must be one of {', '.join(PERIODS)}")
    return UsageQuery(key, since, group_by)


def grouped(rows: Iterable[UsageRow], group_by: str) -> list[dict]:
    """Minute rows summed per (period, model), oldest period first, then by model: `/usage`'s rows (a
    request that named no model is counted under model null)."""
    size = PERIODS[group_by]
    acc: dict[tuple[int, str], list[int]] = {}
    for r in rows:
        c = acc.setdefault(((r.minute // size) * size, r.model), [0, 0, 0])
        c[0] += r.requests
        c[1] += r.input_tokens
        c[2] += r.output_tokens
    return [{"period_start": start, "model": model or None, "requests": c[0], "input_tokens": c[1],
             "output_tokens": c[2]} for (start, model), c in sorted(acc.items())]


def answer(q: UsageQuery, rows: Iterable[UsageRow]) -> dict:
    """The `/usage` JSON for a query and the key's stored rows since its minute."""
    out = grouped(rows, q.group_by)
    total = {"requests": 0, "input_tokens": 0, "output_tokens": 0}
    for r in out:
        for k in total:
            total[k] += r[k]
    since: float | int = int(q.since) if float(q.since).is_integer() else q.since
    return {"key": q.key, "since": since, "group_by": q.group_by, "rows": out, "total": total}


def batches(counts: Mapping[tuple[str, str, int], list[int]], size: int = BATCH_ROWS) -> list[Batch]:
    """Gathered counts cut into batches of at most `size` rows, each with a fresh id."""
    rows = [UsageRow(k, m, minute, c[0], c[1], c[2]) for (k, m, minute), c in counts.items()]
    return [Batch(uuid.uuid4().hex, tuple(rows[i:i + size])) for i in range(0, len(rows), size)]


# -- the in-memory store ------------------------------------------------------------------------------
class MemoryUsageStore:
    """Rows in a dict, for `clients.store: memory` (gone with the daemon)."""

    kind = "memory"

    def __init__(self) -> None:
        self._rows: dict[tuple[str, int, str], list[int]] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def apply(self, batch: Batch, retention_s: float, now: float) -> None:
        for r in batch.rows:
            c = self._rows.setdefault((r.key, r.minute, r.model), [0, 0, 0])
            c[0] += r.requests
            c[1] += r.input_tokens
            c[2] += r.output_tokens

    async def rows(self, key: str, since_minute: int) -> list[UsageRow]:
        return [UsageRow(k, model, minute, *c) for (k, minute, model), c in self._rows.items()
                if k == key and minute >= since_minute]

    async def prune(self, before_minute: int) -> int:
        old = [k for k in self._rows if k[1] < before_minute]
        for k in old:
            del self._rows[k]
        return len(old)


# -- the log ------------------------------------------------------------------------------------------
class UsageLog:
    """Gathers settled usage in memory (a UsageSink) and writes it to its store; `run()` is its background
    task, `aclose()` its last flush."""

    def __init__(self, store: UsageStore, retention_s: float, clock: Callable[[], float] = time.time,
                 spill_dir: str | None = None):
        self.store = store
        self.retention_s = retention_s
        self.spill_dir = spill_dir           # where unwritten batches wait from one run to the next
        self._clock = clock                 # wall time: minutes are stored and shown
        self._pending: dict[tuple[str, str, int], list[int]] = {}
        self._unwritten: list[Batch] = []    # formed and tried; written again, as they are, until one succeeds
        self._lock = asyncio.Lock()          # one flush at a time (the timer, a query, shutdown)
        self.available = True                # the last write reached the store

    def record(self, usage: UsageRecord) -> None:
        """One answered request (the request path's UsageSink): counted now, written at the next flush."""
        k = (usage.key, usage.model or "", int(usage.at // MINUTE_S) * MINUTE_S)  # (minute_of, on every answer)
        c = self._pending.get(k)
        if c is None:
            c = self._pending[k] = [0, 0, 0]
        c[0] += 1
        c[1] += max(0, usage.input_tokens)
        c[2] += max(0, usage.output_tokens)

    def unwritten(self) -> tuple[int, int]:
        """Rows not yet known to be in the store: (gathered since the last flush, in batches to write again)."""
        return len(self._pending), sum(len(b.rows) for b in self._unwritten)

    async def flush(self) -> bool:
        """Write what was gathered; False when the store is down (all of it is kept for the next try)."""
        async with self._lock:
            if self._pending and not self._unwritten:
                # a failed batch is retried alone first: new counts wait beside it, so that memory stays
                # one dict per (key, model, minute) however long the store is down
                self._unwritten = batches(self._pending)
                self._pending = {}
            while self._unwritten:
                try:
                    await self.store.apply(self._unwritten[0], self.retention_s, self._clock())
                except UsageUnavailable as exc:
                    if self.available:
                        log.warning("usage_store_down", store=self.store.kind, error=str(exc),
                                    kept_rows=sum(self.unwritten()))
                    self.available = False
                    return False
                self._unwritten.pop(0)
                if not self._unwritten and self._pending:
                    self._unwritten = batches(self._pending)
                    self._pending = {}
            if not self.available:
                log.info("usage_store_back", store=self.store.kind)
            self.available = True
            return True

    async def query(self, key: str, since: float) -> list[UsageRow]:
        """The stored minute rows of hashed key `key` from the minute of `since` on, after a flush (so a
        request answered just now is in them). Raises UsageUnavailable."""
        if not await self.flush():
            raise UsageUnavailable(f"the usage store ({self.store.kind}) cannot be reached now")
        return await self.store.rows(key, minute_of(since))

    async def prune(self) -> int:
        """Drop the rows older than retention_s."""
        return await self.store.prune(minute_of(self._clock() - self.retention_s))

    async def run(self) -> None:
        """Flush every FLUSH_INTERVAL_S and prune every PRUNE_INTERVAL_S until cancelled."""
        next_prune = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self.flush()
            if time.monotonic() >= next_prune:
                with contextlib.suppress(UsageUnavailable):   # the flush said so already
                    gone = await self.prune()
                    if gone:
                        log.debug("usage_pruned", rows=gone)
                next_prune = time.monotonic() + PRUNE_INTERVAL_S

    async def take_spilled(self) -> int:
        """Take back the batches a shutdown left in spill_dir (to be written first, with their ids);
        how many rows."""
        if self.spill_dir is None:
            return 0
        got = await asyncio.to_thread(take_spilled, self.spill_dir)
        self._unwritten = got + self._unwritten
        return sum(len(b.rows) for b in got)

    async def aclose(self) -> None:
        """A last flush, then the store closes; what cannot be written now goes to spill_dir."""
        if not await self.flush():
            left = self._unwritten + batches(self._pending)
            rows = sum(len(b.rows) for b in left)
            self._unwritten, self._pending = [], {}
            try:
                path = await asyncio.to_thread(spill, self.spill_dir, left) if self.spill_dir else None
            except OSError as exc:
                log.error("usage_not_written", store=self.store.kind, rows=rows, error=str(exc))
            else:
                if path is None:
                    log.error("usage_not_written", store=self.store.kind, rows=rows, reason="no state directory")
                else:
                    log.warning("usage_kept_on_disk", store=self.store.kind, rows=rows, path=path,
                                action="the next start writes it")
        await self.store.close()


def spill(directory: str, left: list[Batch]) -> str:
    """Write batches to a new file in `directory` (atomically: a temp file renamed); its path."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{SPILL_PREFIX}{uuid.uuid4().hex}.json")
    data = [{"id": b.id, "rows": [[r.key, r.model, r.minute, r.requests, r.input_tokens, r.output_tokens]
                                  for r in b.rows]} for b in left]
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def take_spilled(directory: str) -> list[Batch]:
    """The batches of every spill file in `directory`, each file taken (removed) as it is read; a file
    that cannot be read is renamed `.bad` and said so."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(SPILL_PREFIX) and n.endswith(".json"))
    except FileNotFoundError:
        return []
    out: list[Batch] = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            got = [Batch(str(b["id"]), tuple(UsageRow(str(k), str(m), int(mi), int(r), int(i), int(o))
                                             for k, m, mi, r, i, o in b["rows"])) for b in data]
        except FileNotFoundError:
            continue                       # another daemon on this directory took it first
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("usage_spill_unreadable", path=path, error=str(exc), action="renamed .bad")
            with contextlib.suppress(OSError):
                os.replace(path, path + ".bad")
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue                       # taken by another daemon meanwhile: its batches, not ours
        out += got
    return out


def open_usage_store(store: str) -> UsageStore:
    """The usage store `clients.store` names (not yet opened): memory, sqlite:///PATH or a Redis URL."""
    if store == "memory":
        return MemoryUsageStore()
    from ..jobs.settings import parse_store_url

    spec = parse_store_url(store)
    if spec.kind == "sqlite":
        from .usage_sqlite import SqliteUsageStore

        assert spec.path
        return SqliteUsageStore(spec.path)
    from .redis_store import RedisUsageStore

    assert spec.url
    return RedisUsageStore(spec.url)
