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
from math import floor
from typing import NamedTuple, Protocol

from . import bucket
from .bucket import Level

_PRUNE_AT = 65536  # buckets kept before forgettable ones are dropped


class StoreUnavailable(Exception):
    """The store's backend cannot be reached (Redis down); budgets then fail open."""


class Limits(NamedTuple):
    """One client's budget per minute; 0 = unlimited in that dimension."""

    tokens_per_minute: int = 0
    requests_per_minute: int = 0

    @property
    def limited(self) -> bool:
        """Whether either bucket applies (a client with neither has no budget to keep)."""
        return self.tokens_per_minute > 0 or self.requests_per_minute > 0


class RateState(NamedTuple):
    """What OpenAI's `x-ratelimit-*` headers say for one client: per dimension its limit, the whole
    units left, and seconds until the bucket is full again. A dimension with limit 0 is unlimited and
    gets no headers."""

    limit_requests: int
    remaining_requests: int
    reset_requests_s: float
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float


class Take(NamedTuple):
    """The answer to a take: admitted or not, seconds until both buckets have room (0 when admitted),
    and the buckets after it (for the headers)."""

    admitted: bool
    retry_after_s: float
    state: RateState


class BudgetStore(Protocol):
    """Where client buckets live (see the module docstring for the contract)."""

    sync: bool
    """True for a store whose calls never suspend: it also has `take_now` and `adjust_now`, the same
    calls without a coroutine, which the request path makes instead."""

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


class UsageRecord(NamedTuple):
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
    """One client's two bucket levels (None where that dimension is unlimited), both as of `at`."""

    __slots__ = ("requests", "tokens", "at")

    def __init__(self, at: float) -> None:
        self.requests: float | None = None
        self.tokens: float | None = None
        self.at = at


def _state(req: float | None, tok: float | None, rpm: int, tpm: int) -> RateState:
    return RateState(
        rpm, bucket.remaining(req) if req is not None else 0, bucket.full_in_s(req, rpm) if req is not None else 0.0,
        tpm, bucket.remaining(tok) if tok is not None else 0, bucket.full_in_s(tok, tpm) if tok is not None else 0.0,
    )


def rate_state(req: Level | None, tok: Level | None, limits: Limits) -> RateState:
    """The header figures of a client's buckets (None: that dimension is unlimited)."""
    return _state(req.level if req is not None else None, tok.level if tok is not None else None,
                  limits.requests_per_minute, limits.tokens_per_minute)


class MemoryBudgetStore:
    """Buckets in this process's memory: exact and cheap, but each daemon has its own. Its calls never
    suspend, so the request path makes them directly (`take_now`, `adjust_now`), without a coroutine."""

    sync = True

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Buckets] = {}

    def _refilled(self, key: str, rpm: int, tpm: int, now: float) -> _Buckets:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            b = self._buckets[key] = _Buckets(now)
        # a new limit starts full; a limit set to 0 by a reload drops its bucket. (bucket.refill written out:
        # this runs twice on every budgeted request)
        r, t = b.requests, b.tokens
        dt = now - b.at
        if rpm:
            if r is None:
                b.requests = float(rpm)
            elif dt > 0:
                r += dt * rpm / bucket.PERIOD_S
                b.requests = r if r < rpm else float(rpm)
        elif r is not None:
            b.requests = None
        if tpm:
            if t is None:
                b.tokens = float(tpm)
            elif dt > 0:
                t += dt * tpm / bucket.PERIOD_S
                b.tokens = t if t < tpm else float(tpm)
        elif t is not None:
            b.tokens = None
        b.at = now
        return b

    def _prune(self, now: float) -> None:
        """Forget buckets that are full by now (a fresh bucket is the same thing): untouched for over a
        minute and not in debt then. A store keeps no capacities, so this is the test it can make."""
        stale = [k for k, b in self._buckets.items() if now - b.at > bucket.PERIOD_S
                 and (b.requests is None or b.requests >= 0) and (b.tokens is None or b.tokens >= 0)]
        for k in stale:
            del self._buckets[k]

    async def take(self, key: str, limits: Limits, tokens: int) -> Take:
        return self.take_now(key, limits, tokens)

    def take_now(self, key: str, limits: Limits, tokens: int) -> Take:
        tpm, rpm = limits
        b = self._refilled(key, rpm, tpm, self._clock())
        req, tok = b.requests, b.tokens
        # (bucket.wait_s and _state written out for the usual admitted take: this runs on every request)
        if (req is not None and req < 1.0) or (tok is not None and tok < (tokens if tokens < tpm else tpm)):
            wait = max(bucket.wait_s(req, 1, rpm) if req is not None else 0.0,
                       bucket.wait_s(tok, tokens, tpm) if tok is not None else 0.0)
            return Take(False, wait, _state(req, tok, rpm, tpm))
        rr = rt = 0
        resr = rest = 0.0
        if req is not None:
            req = b.requests = req - 1
            rr = floor(req) if req > 0 else 0
            resr = (rpm - req) * bucket.PERIOD_S / rpm if req < rpm else 0.0
        if tok is not None:
            tok = b.tokens = tok - tokens
            rt = floor(tok) if tok > 0 else 0
            rest = (tpm - tok) * bucket.PERIOD_S / tpm if tok < tpm else 0.0
        return Take(True, 0.0, RateState(rpm, rr, resr, tpm, rt, rest))

    async def adjust(self, key: str, limits: Limits, tokens: int, *, refund_request: bool = False) -> None:
        self.adjust_now(key, limits, tokens, refund_request)

    def adjust_now(self, key: str, limits: Limits, tokens: int, refund_request: bool = False) -> None:
        tpm, rpm = limits
        b = self._refilled(key, rpm, tpm, self._clock())
        if b.tokens is not None and tokens:
            b.tokens = min(float(tpm), b.tokens - tokens)
        if b.requests is not None and refund_request:
            b.requests = min(float(rpm), b.requests + 1)

    async def aclose(self) -> None:
        self._buckets.clear()
