"""The budgets facade the request path calls (`Budgets`), and one request's budget (`Charge`).

At admission a request is charged its estimate (metering.estimate) in its client's buckets; past the
budget, or past `max_parallel`, it gets 429 `rate_limited` with Retry-After from the refill. The
answer carries OpenAI's `x-ratelimit-*` headers. When the answer ends the charge is settled with what
the answer says it used (or refunded, request included, when no worker answer reached the client),
the usage is handed to the usage sink and counted in the client metrics. Every charge is settled
exactly once and releases its `max_parallel` place exactly once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import structlog

from ..errors import Rejected
from ..fairness import configured_key
from .metering import AnswerMeter, Estimate, estimate, json_usage
from .store import BudgetStore, Limits, MemoryBudgetStore, RateState, StoreUnavailable, Take, UsageRecord, UsageSink

if TYPE_CHECKING:
    from ..config import ClientBudget, Settings
    from ..http.call import Call
    from ..metrics import Metrics

log = structlog.get_logger("supervisor.budgets")

OTHER = "other"  # the metric label of every client not named under clients.keys
TOKEN_QUANTUM = 256.0  # with budgets on, fairness (DRR) charges a request its estimate in units of this,
MAX_COST = 32.0  # capped (8192 tokens), so a turn of the round robin never needs more than this many rounds
_RATELIMIT = b"x-ratelimit-"


def go_duration(s: float) -> str:
    """Seconds as OpenAI writes its reset headers (Go durations): '0s', '250ms', '1s', '6m0s', '1m2.5s'."""
    if s <= 0:
        return "0s"
    ms = math.ceil(s * 1000)
    if ms < 1000:
        return f"{ms}ms"
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    sec = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{sec}s"


def _reset(s: float) -> bytes:
    """A reset header's value: under a second (the usual case of a budget in use) without go_duration."""
    return b"%dms" % math.ceil(s * 1000) if 0 < s < 0.999 else go_duration(s).encode()


def rate_headers(st: RateState) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers for the limited dimensions of a client's budget."""
    lr, rr, resr, lt, rt, rest = st
    if lr:
        h = [(b"x-ratelimit-limit-requests", b"%d" % lr), (b"x-ratelimit-remaining-requests", b"%d" % rr),
             (b"x-ratelimit-reset-requests", _reset(resr))]
        if lt:
            h += ((b"x-ratelimit-limit-tokens", b"%d" % lt), (b"x-ratelimit-remaining-tokens", b"%d" % rt),
                  (b"x-ratelimit-reset-tokens", _reset(rest)))
        return h
    if lt:
        return [(b"x-ratelimit-limit-tokens", b"%d" % lt), (b"x-ratelimit-remaining-tokens", b"%d" % rt),
                (b"x-ratelimit-reset-tokens", _reset(rest))]
    return []


_REQUEST_LINES = (b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: %d\r\n"
                  b"x-ratelimit-reset-requests: %b\r\n")
_TOKEN_LINES = (b"x-ratelimit-limit-tokens: %d\r\nx-ratelimit-remaining-tokens: %d\r\n"
                b"x-ratelimit-reset-tokens: %b\r\n")
_BOTH_LINES = _REQUEST_LINES + _TOKEN_LINES


def rate_lines(st: RateState) -> bytes:
    """`rate_headers` as whole header lines, made in one step (they go on every budgeted answer)."""
    lr, rr, resr, lt, rt, rest = st
    if lr:
        if lt:
            return _BOTH_LINES % (lr, rr, _reset(resr), lt, rt, _reset(rest))
        return _REQUEST_LINES % (lr, rr, _reset(resr))
    if lt:
        return _TOKEN_LINES % (lt, rt, _reset(rest))
    return b""


def open_store(url: str) -> BudgetStore:
    """The budget store `clients.store` names: Redis shares buckets across daemons; with memory or
    SQLite (where usage is kept) each daemon keeps its buckets in memory."""
    if url.startswith(("redis://", "rediss://")):
        from .redis_store import RedisBudgetStore

        return RedisBudgetStore(url)
    return MemoryBudgetStore()


class _Client:
    """A client's configured budget, its metric label and metric children."""

    __slots__ = ("name", "label", "limits", "budgeted", "max_parallel", "tokens_in", "tokens_out", "limited")

    def __init__(self, name: str | None, b: ClientBudget, metrics: Metrics):
        self.name = name
        self.label = name if name is not None else OTHER
        self.limits = Limits(b.tokens_per_minute, b.requests_per_minute)
        self.budgeted = self.limits.limited  # a bucket is kept for it
        self.max_parallel = b.max_parallel
        self.tokens_in = metrics.client_count(self.label, "input")
        self.tokens_out = metrics.client_count(self.label, "output")
        self.limited = metrics.client_count(self.label, None)


class Charge:
    """One request's budget, from admission to settlement."""

    __slots__ = ("key", "client", "estimate", "charged", "taken", "state", "meter", "status", "parallel",
                 "settled", "retry_after_s", "deferred", "whole", "used")

    def __init__(self, key: str, client: _Client, est: Estimate, charged: int):
        self.key = key
        self.client = client
        self.estimate = est
        self.charged = charged  # tokens taken at admission, as clients.count counts them
        self.taken = False  # the store took it (False: unbudgeted, refused, or the store was down)
        self.state: RateState | None = None  # the buckets after the take (for the headers)
        self.meter: AnswerMeter | None = None  # set when a worker answer starts going to the client
        self.status = 0
        self.parallel = False  # holds a max_parallel place
        self.settled = False
        self.retry_after_s: float | None = None  # refused: when to come back
        self.deferred = False  # a job's: nothing taken before, what it used is taken when it ends
        self.whole = False  # a whole JSON answer went to the client (`used` is what it said), see answered()
        self.used: tuple[int, int] | None = None

    def add_headers(self, headers: list[tuple[bytes, bytes]],
                    names: list[bytes]) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The answer's headers without any x-ratelimit-* the worker sent (ours replace them: the client's
        budget here is what it has), and ours as whole header lines (Responder.send_now's `lines`).
        `names`: the worker's header names, lowercased."""
        if self.state is None:
            return headers, b""
        for n in names:
            if n.startswith(_RATELIMIT):
                headers = [kv for kv in headers if not kv[0].lower().startswith(_RATELIMIT)]
                break
        return headers, rate_lines(self.state)

    def error_headers(self, headers: dict[str, str]) -> None:
        """The same headers on an answer the daemon makes itself; a refusal adds retry-after-ms."""
        if self.state is not None:
            headers.update((k.decode(), v.decode()) for k, v in rate_headers(self.state))
        if self.retry_after_s is not None:
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))

    def answered(self, status: int, content_type: bytes | None, body: bytes) -> None:
        """A whole worker answer goes to the client: from here the request is settled, not refunded. (A JSON
        answer is read at once, without a meter: the usual answer, on every budgeted request.)"""
        ct = content_type or b""
        if b"json" in ct and not ct.startswith(b"text/event-stream"):
            self.status = status
            self.whole = True
            self.used = json_usage(body)
        else:
            self.begin(status, ct).feed(body)

    def begin(self, status: int, content_type: bytes | None) -> AnswerMeter:
        """A worker answer starts going to the client: from here the request is settled, not refunded."""
        self.status = status
        self.meter = m = AnswerMeter(content_type or b"")
        return m


class Budgets:
    """Client budgets on the request path (active when `clients` is configured)."""

    def __init__(self, settings: Settings, metrics: Metrics, store: BudgetStore | None = None):
        self.metrics = metrics
        self.store_url = settings.clients.store if settings.clients is not None else "memory"
        self.store: BudgetStore = store if store is not None else open_store(self.store_url)
        self.sink: UsageSink | None = None  # the usage log, when one is kept
        self.parallel: dict[str, int] = {}  # requests admitted and not yet settled, per key with max_parallel
        self.derive(settings)

    def derive(self, s: Settings) -> None:
        """Take new settings: limits, names and `count` apply from the next request (the store stays)."""
        c = s.clients
        self.active = c is not None
        if c is None:
            return
        if c.store != self.store_url:
            log.warning("budget_store_kept", store=self.store_url.split("://", 1)[0],
                        reason="a changed clients.store takes effect at the next start")
        m = self.metrics
        self.count = c.count
        self.default = _Client(None, c.default, m)
        fair = s.queue.fairness
        self.clients = {configured_key(fair, key): _Client(b.name or key, b, m) for key, b in c.keys.items()}

    def counted(self, input_tokens: int, output_tokens: int) -> int:
        """Tokens as `clients.count` counts them."""
        count = self.count
        return input_tokens + output_tokens if count == "total" else output_tokens if count == "output" \
            else input_tokens

    async def charge(self, call: Call, content_length: int | None) -> None:
        """Charge a request at admission (call.charge, call.cost); 429 rate_limited past its budget."""
        pending = self.charge_now(call, content_length)
        if pending is not None:
            await pending

    def charge_now(self, call: Call, content_length: int | None) -> Awaitable[None] | None:
        """`charge`, done here when the store never suspends (memory); else what is left to await."""
        key = call.client or ""
        cl = self.clients.get(key) or self.default
        est = estimate(call.body, content_length, call.path, call.document())
        count = self.count
        tokens = est.input + est.output if count == "total" else est.output if count == "output" else est.input
        ch = call.charge = Charge(key, cl, est, tokens)
        cost = tokens / TOKEN_QUANTUM
        call.cost = MAX_COST if cost > MAX_COST else cost if tokens > 0 else 1 / TOKEN_QUANTUM
        if cl.max_parallel:
            n = self.parallel.get(key, 0)
            if n >= cl.max_parallel:
                ch.settled = True
                self._refuse(ch, f"this client has {n} requests in flight, its max_parallel", 1.0)
            self.parallel[key] = n + 1
            ch.parallel = True
        if not cl.budgeted:
            return None
        store = self.store
        if store.sync:
            take = store.take_now(key, cl.limits, tokens)  # type: ignore[attr-defined]
            if take.admitted:  # (the usual case of _taken)
                ch.state = take.state
                ch.taken = True
            else:
                self._taken(ch, take)
            return None
        return self._take(ch)

    async def _take(self, ch: Charge) -> None:
        try:
            take = await self.store.take(ch.key, ch.client.limits, ch.charged)
        except StoreUnavailable:
            self.metrics.budget_store_errors.inc()  # fail open: admitted, no budget kept for it
            return
        self._taken(ch, take)

    def _taken(self, ch: Charge, take: Take) -> None:
        ch.state = take.state
        if not take.admitted:
            self._release(ch)
            ch.settled = True
            what = ("tokens" if take.state.limit_tokens and take.state.remaining_tokens < ch.charged
                    else "requests")
            self._refuse(ch, f"this client's budget of {what} per minute is spent for now "
                         f"(this request is estimated at {ch.charged} tokens)", take.retry_after_s)
        ch.taken = True

    def charge_job(self, call: Call) -> None:
        """A job's delivery: never refused by the budget (it waited its turn already), and charged what
        it used when it ends, so a client's jobs spend the same budget as its requests."""
        key = call.client or ""
        cl = self.clients.get(key) or self.default
        est = estimate(call.body, None, call.path, call.document())
        ch = call.charge = Charge(key, cl, est, 0)
        ch.deferred = True
        call.cost = min(max(self.counted(est.input, est.output), 1) / TOKEN_QUANTUM, MAX_COST)

    def _refuse(self, ch: Charge, why: str, retry_after_s: float) -> None:
        ch.retry_after_s = retry_after_s
        ch.client.limited.n += 1
        raise Rejected("rate_limited", why, retry_after_s)

    def _release(self, ch: Charge) -> None:
        if ch.parallel:
            ch.parallel = False
            n = self.parallel[ch.key] - 1
            if n:
                self.parallel[ch.key] = n
            else:
                del self.parallel[ch.key]

    async def settle(self, ch: Charge, model: str | None = None) -> None:
        """Settle once: with the answer's usage (else its streamed chunks, else the estimate; an error
        answer without usage used nothing), or a full refund when no worker answer reached the client."""
        pending = self.settle_now(ch, model)
        if pending is not None:
            await pending

    def settle_now(self, ch: Charge, model: str | None = None) -> Awaitable[None] | None:
        """`settle`, done here when the store never suspends (memory); else what is left to await."""
        if ch.settled:
            return None
        ch.settled = True
        if ch.parallel:
            self._release(ch)
        cl = ch.client
        meter = ch.meter
        if meter is not None:
            used = meter.result()
        elif ch.whole:
            used = ch.used
        else:
            return self._adjust(ch, -ch.charged, True) if ch.taken else None
        est = ch.estimate
        if used is not None:
            inp, out = used
        elif meter is not None and meter.sse:
            inp, out = est.input, meter.chunks
        elif ch.status >= 400:
            inp, out = 0, 0
        else:
            inp, out = est.input, est.output
        cl.tokens_in.n += inp
        cl.tokens_out.n += out
        if self.sink is not None:
            self.sink.record(UsageRecord(ch.key, cl.name, model or est.model, inp, out, time.time()))
        if ch.taken or (ch.deferred and cl.budgeted):
            delta = self.counted(inp, out) - ch.charged
            if delta:
                return self._adjust(ch, delta, False)
        return None

    def _adjust(self, ch: Charge, tokens: int, refund: bool) -> Awaitable[None] | None:
        store = self.store
        if store.sync:
            store.adjust_now(ch.key, ch.client.limits, tokens, refund)  # type: ignore[attr-defined]
            return None
        return self._adjust_async(ch, tokens, refund)

    async def _adjust_async(self, ch: Charge, tokens: int, refund: bool) -> None:
        try:
            await self.store.adjust(ch.key, ch.client.limits, tokens, refund_request=refund)
        except StoreUnavailable:
            self.metrics.budget_store_errors.inc()

    async def aclose(self) -> None:
        await self.store.aclose()
