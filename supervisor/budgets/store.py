"""The budget store interface (`BudgetStore`), its in-memory implementation, and the usage hook (`UsageSink`).

A store holds two token buckets per client, keyed by the hashed client key (supervisor/fairness.py
hash_key, never a clear value): requests and tokens, each refilling continuously at its per-minute
limit (bucket.py). The caller passes the client's `Limits` on every call, so a reload that changes a
limit takes effect at the next request and a store needs no copy of the config.

Contract for every implementation (memory here; Redis shares budgets across daemons):
- `take` refills both buckets to the store's own clock and takes 1 request plus the token estimate
  only if BOTH have room (all or nothing, atomically for that key: no lost update when several
  daemons share the store); otherwise takes nothing and says when there will be room.
- `adjust` settles a request: takes more tokens, or gives tokens back (capped at a full bucket); with
  `refund_request` it also gives back the request (a request that never reached a worker).
- A limit of 0 is unlimited: that bucket is neither kept nor reported. A bucket first seen is full.
- A store that cannot reach its backend raises `StoreUnavailable`; the caller fails open (admits,
  logs and counts), so a store outage never stops traffic.
- Methods are coroutines; the memory store never suspends, so its cost is that of a function call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import bucket
from .bucket import Level

_PRUNE_AT = 65536  # buckets kept before forgettable ones are dropped


class StoreUnavailable(Exception):
    """The store's backend cannot be reached (Redis down); budgets then fail open."""


@dataclass(frozen=True, slots=True)
class Limits:
    """One client's budget per minute; 0 = unlimited in that dimension."""

    tokens_per_minute: int = 0
    requests_per_minute: int = 0

    @property
    def limited(self) -> bool:
        """Whether either bucket applies (a client with neither has no budget to keep)."""
        return self.tokens_per_minute > 0 or self.requests_per_minute > 0


@dataclass(frozen=True, slots=True)
class RateState:
    """What OpenAI's `x-ratelimit-*` headers say for one client: per dimension its limit, the whole
    units left, and seconds until the bucket is full again. A dimension with limit 0 is unlimited and
    gets no headers."""

    limit_requests: int
    remaining_requests: int
    reset_requests_s: float
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float


@dataclass(frozen=True, slots=True)
class Take:
    """The answer to a take: admitted or not, seconds until both buckets have room (0 when admitted),
    and the buckets after it (for the headers)."""

    admitted: bool
    retry_after_s: float
    state: RateState


class BudgetStore(Protocol):
    """Where client buckets live (see the module docstring for the contract)."""

    async def take(self, key: str, limits: Limits, tokens: int) -> Take:
        """Refill, then take 1 request and `tokens` if both buckets have room; else take nothing."""
        ...

    async def adjust(self, key: str, limits: Limits, tokens: int, *, refund_request: bool = False) -> None:
        """Take `tokens` more (positive) or give back -`tokens` (negative); give back the request too
        when `refund_request`."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One answered request's settled usage, as the usage log keeps it."""

    key: str  # hashed client key
    name: str | None  # the client's name listed under `clients.keys`, else None
    model: str | None  # the request body's `model`, when it had one
    input_tokens: int
    output_tokens: int
    at: float  # wall-clock time (unix seconds) the answer ended


class UsageSink(Protocol):
    """Receives every answered request's usage, once, on the event loop: it must not block (buffer and
    write elsewhere)."""

    def record(self, usage: UsageRecord) -> None:
        """Keep one answered request's usage."""
        ...


class _Buckets:
    """One client's two buckets (None where that dimension is unlimited)."""

    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests: Level | None = None
        self.tokens: Level | None = None


def rate_state(req: Level | None, tok: Level | None, limits: Limits) -> RateState:
    """The header figures of a client's buckets (None: that dimension is unlimited)."""
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    return RateState(
        rpm, bucket.remaining(req) if req else 0, bucket.full_in_s(req, rpm) if req else 0.0,
        tpm, bucket.remaining(tok) if tok else 0, bucket.full_in_s(tok, tpm) if tok else 0.0,
    )


class MemoryBudgetStore:
    """Buckets in this process's memory: exact and cheap, but each daemon has its own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Buckets] = {}

    def _refilled(self, key: str, limits: Limits, now: float) -> _Buckets:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            b = self._buckets[key] = _Buckets()
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        # A limit set to 0 by a reload drops its bucket; a new limit starts full.
        b.requests = (bucket.refill(b.requests, rpm, now) if b.requests else Level(float(rpm), now)) if rpm else None
        b.tokens = (bucket.refill(b.tokens, tpm, now) if b.tokens else Level(float(tpm), now)) if tpm else None
        return b

    def _prune(self, now: float) -> None:
        """Forget buckets that are full by now (a fresh bucket is the same thing): untouched for over a
        minute and not in debt then. A store keeps no capacities, so this is the test it can make."""
        stale = [k for k, b in self._buckets.items()
                 if all(lv is None or (now - lv.at > bucket.PERIOD_S and lv.level >= 0)
                        for lv in (b.requests, b.tokens))]
        for k in stale:
            del self._buckets[k]

    async def take(self, key: str, limits: Limits, tokens: int) -> Take:
        now = self._clock()
        b = self._refilled(key, limits, now)
        req, tok = b.requests, b.tokens
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        wait = max(bucket.wait_s(req, 1, rpm) if req else 0.0, bucket.wait_s(tok, tokens, tpm) if tok else 0.0)
        if wait > 0:
            return Take(False, wait, rate_state(req, tok, limits))
        if req:
            req = b.requests = Level(req.level - 1, now)
        if tok:
            tok = b.tokens = Level(tok.level - tokens, now)
        return Take(True, 0.0, rate_state(req, tok, limits))

    async def adjust(self, key: str, limits: Limits, tokens: int, *, refund_request: bool = False) -> None:
        now = self._clock()
        b = self._refilled(key, limits, now)
        if b.tokens and tokens:
            b.tokens = Level(min(float(limits.tokens_per_minute), b.tokens.level - tokens), now)
        if b.requests and refund_request:
            b.requests = Level(min(float(limits.requests_per_minute), b.requests.level + 1), now)

    async def aclose(self) -> None:
        self._buckets.clear()
