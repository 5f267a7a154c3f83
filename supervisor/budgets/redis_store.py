"""Redis for budgets and usage (`clients.store: redis://HOST:PORT/DB`): daemons on several hosts share
each client's buckets and one usage record.

Every change is one Lua script (EVALSHA, EVAL again when the server lost its scripts), so concurrent
takes from any number of daemons lose no update. Buckets refill to Redis's own clock (TIME, read in
the script): daemons on several hosts have clocks that differ, and a bucket refilled to one host's
time and then to another's, earlier one would gain or lose the difference at every alternation; one
clock for all keeps the refill exact. A budget store that cannot reach Redis raises StoreUnavailable
(the request path then admits: budgets fail open), says so once per outage, and the next call
reconnects by itself.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from .bucket import Level
from .store import Limits, StoreUnavailable, Take, rate_state
from .usage import Batch, UsageRow, UsageUnavailable

log = structlog.get_logger("supervisor.budgets.redis")
T = TypeVar("T")

PREFIX = "gpu-supervisor:"
BUDGET = PREFIX + "budget:"             # budget:{key} hash: rl, ra (requests level, at), tl, ta (tokens)
USAGE = PREFIX + "usage:"               # usage:{key}:{minute} hash of r|i|o:<model>; usage:{key} zset of minutes
USAGE_BATCH = PREFIX + "usage-batch:"   # a batch id applied (SET NX): the same batch again is a no-op
BATCH_MARK_S = 86400                    # a batch is retried within the daemon's life, long before this
MAX_CONNECTIONS = 32                    # per client; a script runs in well under a millisecond
READ_CHUNK = 500                        # minute hashes read per pipeline round trip

# Apply one usage batch once. KEYS[1] the batch mark, then per row (minute hash, key's minute index);
# ARGV[1] the mark's TTL, then per row: minute, model, requests, input, output, TTL (s), the prune cutoff.
APPLY_USAGE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 1, (#KEYS - 1) / 2 do
  local h, idx, a = KEYS[2 * i], KEYS[2 * i + 1], 2 + (i - 1) * 7
  local minute, model, ttl = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 5])
  redis.call('HINCRBY', h, 'r|' .. model, ARGV[a + 2])
  redis.call('HINCRBY', h, 'i|' .. model, ARGV[a + 3])
  redis.call('HINCRBY', h, 'o|' .. model, ARGV[a + 4])
  if redis.call('TTL', h) < ttl then redis.call('EXPIRE', h, ttl) end
  redis.call('ZADD', idx, minute, minute)
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', '(' .. ARGV[a + 6])
  if redis.call('TTL', idx) < ttl then redis.call('EXPIRE', idx, ttl) end
end
return 1
"""


# One client's two buckets, refilled to Redis's clock, then a take (all or nothing) or a settlement.
# KEYS[1] the client's hash; ARGV: requests per minute, tokens per minute, mode ('take' or 'adjust'),
# tokens (take: the estimate; adjust: more to take, < 0 to give back), refund a request ('1' or '0').
# A limit of 0 drops its bucket; a bucket first seen is full; the hash expires once both are full
# again (a missing bucket is a full one). Returns admitted, seconds to wait, requests level, tokens
# level (levels '' where unlimited), as strings (Lua numbers would come back truncated to integers).
BUCKETS = """
redis.replicate_commands()  -- (Redis < 5: writes after TIME need effects replication; later: the default)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local caps = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local names = {{'rl', 'ra'}, {'tl', 'ta'}}
local mode, tokens, refund = ARGV[3], tonumber(ARGV[4]), ARGV[5] == '1'
local levels = {}
for d = 1, 2 do
  local cap = caps[d]
  if cap > 0 then
    local lv = tonumber(redis.call('HGET', KEYS[1], names[d][1]))
    local at = tonumber(redis.call('HGET', KEYS[1], names[d][2]))
    if lv == nil or at == nil then
      lv = cap
    elseif now > at then
      lv = math.min(cap, lv + (now - at) * cap / 60)
    end
    levels[d] = lv
  else
    redis.call('HDEL', KEYS[1], names[d][1], names[d][2])
  end
end
local function shown(d)
  if levels[d] == nil then return '' end
  return string.format('%.6f', levels[d])
end
if mode == 'take' then
  local wait = 0
  local amounts = {1, tokens}
  for d = 1, 2 do
    if levels[d] ~= nil then
      local missing = math.min(amounts[d], caps[d]) - levels[d]
      if missing > 0 then wait = math.max(wait, missing / (caps[d] / 60)) end
    end
  end
  if wait > 0 then return {'0', string.format('%.6f', wait), shown(1), shown(2)} end
  for d = 1, 2 do
    if levels[d] ~= nil then levels[d] = levels[d] - amounts[d] end
  end
else
  if levels[2] ~= nil then levels[2] = math.min(caps[2], levels[2] - tokens) end
  if levels[1] ~= nil and refund then levels[1] = math.min(caps[1], levels[1] + 1) end
end
local ttl = 1
for d = 1, 2 do
  if levels[d] ~= nil then
    redis.call('HSET', KEYS[1], names[d][1], string.format('%.6f', levels[d]), names[d][2], string.format('%.6f', now))
    ttl = math.max(ttl, math.ceil((caps[d] - levels[d]) / (caps[d] / 60)) + 1)
  end
end
if levels[1] ~= nil or levels[2] ~= nil then redis.call('EXPIRE', KEYS[1], ttl) end
return {'1', '0', shown(1), shown(2)}
"""


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def safe_url(url: str) -> str:
    """The URL without its credentials, for logs."""
    head, sep, tail = url.partition("@")
    return (head.split("//")[0] + "//***@" + tail) if sep else head


def client(url: str, connect_timeout_s: float = 1.0, op_timeout_s: float = 2.0) -> aioredis.Redis:
    """A client with short timeouts and no silent retries: a server that is down answers at once (the
    caller decides), and the next call reconnects by itself. At most MAX_CONNECTIONS connections: a
    burst of calls waits (up to the call's timeout) for one, rather than failing past a pool's limit."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=op_timeout_s, socket_connect_timeout=connect_timeout_s,
        socket_timeout=op_timeout_s, retry=Retry(NoBackoff(), 0), retry_on_error=[])
    return aioredis.Redis.from_pool(pool)


class Script:
    """A Lua script run by EVALSHA; when the server does not hold it (restarted, SCRIPT FLUSH), by EVAL,
    which also caches it again: one round trip either way."""

    def __init__(self, r: aioredis.Redis, source: str):
        self._r = r
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._r.eval(self.source, len(keys), *keys, *args)


def _minute_key(key: str, minute: int) -> str:
    return f"{USAGE}{key}:{minute}"


def _index_key(key: str) -> str:
    return USAGE + key


class RedisUsageStore:
    """Minute rows as hashes that expire with retention, indexed per key by a sorted set of minutes."""

    kind = "redis"

    def __init__(self, url: str):
        self.url = url
        self._r = client(url)
        self._apply = Script(self._r, APPLY_USAGE)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisError, OSError) as exc:
            raise UsageUnavailable(f"redis usage store {safe_url(self.url)}: {exc}") from exc

    async def open(self) -> None:
        await self._call(self._r.ping)
        log.info("usage_store_opened", store="redis", url=safe_url(self.url))

    async def close(self) -> None:
        await self._r.aclose()

    async def apply(self, batch: Batch, retention_s: float, now: float) -> None:
        keys, args = [USAGE_BATCH + batch.id], [str(max(BATCH_MARK_S, math.ceil(retention_s)))]
        cutoff = int(now - retention_s)
        for r in batch.rows:
            ttl = max(1, math.ceil(r.minute + 60 + retention_s - now))
            keys += [_minute_key(r.key, r.minute), _index_key(r.key)]
            args += [r.minute, r.model, r.requests, r.input_tokens, r.output_tokens, ttl, cutoff]
        await self._call(lambda: self._apply(keys=keys, args=args))

    async def rows(self, key: str, since_minute: int) -> list[UsageRow]:
        minutes = [int(_s(m)) for m in await self._call(
            lambda: self._r.zrangebyscore(_index_key(key), since_minute, "+inf"))]
        out: list[UsageRow] = []
        for i in range(0, len(minutes), READ_CHUNK):
            chunk = minutes[i:i + READ_CHUNK]

            async def read(chunk: list[int] = chunk) -> list:
                pipe = self._r.pipeline(transaction=False)
                for m in chunk:
                    pipe.hgetall(_minute_key(key, m))
                return await pipe.execute()

            for minute, h in zip(chunk, await self._call(read)):
                counts: dict[str, list[int]] = {}
                for field, value in h.items():
                    kind, _, model = _s(field).partition("|")
                    counts.setdefault(model, [0, 0, 0])["rio".index(kind)] = int(value)
                out += [UsageRow(key, model, minute, *c) for model, c in sorted(counts.items())]
        return out

    async def prune(self, before_minute: int) -> int:
        """Nothing to do: minute hashes expire by themselves, and each write trims its key's index."""
        return 0


def _level(v: bytes | str) -> Level | None:
    """A level the script returned ('' where unlimited); its time does not matter to the headers."""
    text = _s(v)
    return Level(float(text), 0.0) if text else None


class RedisBudgetStore:
    """Each client's buckets in one Redis hash, changed only by the BUCKETS script (a BudgetStore)."""

    kind = "redis"
    sync = False  # every call is a round trip: the request path awaits take and adjust

    def __init__(self, url: str, connect_timeout_s: float = 0.25, op_timeout_s: float = 1.0):
        # short timeouts: a take sits on the request path, and a Redis that does not answer must cost
        # a request little before it is admitted without a budget
        self.url = url
        self.available = True          # the last call reached Redis
        self._r = client(url, connect_timeout_s, op_timeout_s)
        self._buckets = Script(self._r, BUCKETS)

    async def _run(self, key: str, limits: Limits, mode: str, tokens: int, refund: bool) -> list:
        try:
            out = await self._buckets(keys=[BUDGET + key], args=[
                limits.requests_per_minute, limits.tokens_per_minute, mode, tokens, "1" if refund else "0"])
        except (RedisError, OSError) as exc:
            if self.available:
                log.warning("budget_store_down", store="redis", url=safe_url(self.url), error=str(exc),
                            action="requests are admitted without budgets until it is back")
            self.available = False
            raise StoreUnavailable(f"redis budget store {safe_url(self.url)}: {exc}") from exc
        if not self.available:
            log.info("budget_store_back", store="redis", url=safe_url(self.url))
        self.available = True
        return out

    async def take(self, key: str, limits: Limits, tokens: int) -> Take:
        admitted, wait, req, tok = await self._run(key, limits, "take", tokens, False)
        return Take(_s(admitted) == "1", float(_s(wait)), rate_state(_level(req), _level(tok), limits))

    async def adjust(self, key: str, limits: Limits, tokens: int, *, refund_request: bool = False) -> None:
        await self._run(key, limits, "adjust", tokens, refund_request)

    async def aclose(self) -> None:
        await self._r.aclose()
