"""The engine's own load, read from its Prometheus text: the metric names of each engine, one scrape's
reading, and the scraper that keeps each serving replica's latest reading off the request path.

Preset names (waiting / running / KV usage), checked against each engine's documentation:

- vllm: `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`; vLLM before
  the rename (vllm-project/vllm#18354) has `vllm:gpu_cache_usage_perc` instead, read when the new name is
  absent. Labels `model_name` and `engine` (one label set per data-parallel engine). Source:
  https://docs.vllm.ai/en/stable/usage/metrics/ and the `vllm:kv_cache_usage_perc` gauge in vLLM's
  v1 metrics loggers ("KV-cache usage. 1 means 100 percent usage.").
- sglang (needs `--enable-metrics`): `sglang:num_queue_reqs` ("The number of requests in the waiting
  queue"), `sglang:num_running_reqs`, `sglang:token_usage` (a share, 0.28 in the docs' example);
  labelled by `model_name`. Newer releases add `engine_type`, `tp_rank` and `pp_rank`. By default only one
  scheduler per data-parallel rank reports; with `--enable-metrics-for-all-schedulers` every TP rank
  reports, and the sum counts one queue more than once. Source:
  https://docs.sglang.io/docs/references/production_metrics
- tgi: `tgi_queue_size` ("Current queue size"), `tgi_batch_current_size` ("Current batch size"); TGI has
  no KV-usage gauge. Source: https://huggingface.co/docs/text-generation-inference/reference/metrics
- llamacpp (llama-server needs `--metrics`): `llamacpp:requests_deferred`, `llamacpp:requests_processing`,
  `llamacpp:kv_cache_usage_ratio`. The last one is only in builds from before ggml-org/llama.cpp#13660
  (May 2025), which took the KV-cache fields out of /metrics. The "Available metrics" table in
  llama.cpp's tools/server/README.md no longer lists it, and defilantech/LLMKube#1373 found no `kv_cache`
  series on a live server, so on a current build kv_usage reads None.

KV usage is a share in 0..1. Every preset's KV gauge is already such a share (vLLM's `_perc` too, despite
its name). A value over 1 is taken as a percentage and divided by 100; that only happens with an explicit
`kv_usage` name of a gauge in percent. Counts (waiting, running) are summed over a metric's label sets.
KV usage takes the fullest label set, because a sum of shares means nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import structlog
from prometheus_client.parser import text_string_to_metric_families

from supervisor.upstream import UpstreamError, UpstreamPool, fetch

log = structlog.get_logger("supervisor.routing.signals")

MAX_SCRAPE_BYTES = 4 * 1024 * 1024
STALE_INTERVALS = 3  # a reading older than this many intervals is ignored

Key = tuple[str, int]  # (worker, replica index)


@dataclass(frozen=True)
class SignalNames:
    """The metric names to read; for each signal, the first name found in a scrape wins."""

    waiting: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    kv_usage: tuple[str, ...] = ()


PRESETS: dict[str, SignalNames] = {
    "vllm": SignalNames(("vllm:num_requests_waiting",), ("vllm:num_requests_running",),
                        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    "sglang": SignalNames(("sglang:num_queue_reqs",), ("sglang:num_running_reqs",), ("sglang:token_usage",)),
    "tgi": SignalNames(("tgi_queue_size",), ("tgi_batch_current_size",), ()),
    "llamacpp": SignalNames(("llamacpp:requests_deferred",), ("llamacpp:requests_processing",),
                            ("llamacpp:kv_cache_usage_ratio",)),
}


def signal_names(preset: str, waiting: str | None, running: str | None, kv_usage: str | None) -> SignalNames:
    """The preset's names, each overridden by an explicit name when given."""
    if preset == "none":
        names = SignalNames()
    elif preset in PRESETS:
        names = PRESETS[preset]
    else:
        raise ValueError(f"unknown load_signals preset {preset!r} (none, {', '.join(PRESETS)})")
    if waiting is not None:
        names = replace(names, waiting=(waiting,))
    if running is not None:
        names = replace(names, running=(running,))
    if kv_usage is not None:
        names = replace(names, kv_usage=(kv_usage,))
    return names


@dataclass(frozen=True)
class EngineReading:
    """One scrape's view of the engine's load; None where the engine exposes no such metric."""

    waiting: float | None
    running: float | None
    kv_usage: float | None  # 0..1
    at: float  # time.monotonic() of the scrape


def read_signals(text: str, names: SignalNames, at: float) -> EngineReading:
    """The reading from one scrape's Prometheus text; a name that is absent reads None. Raises ValueError
    on text that is not Prometheus exposition."""
    wanted = {*names.waiting, *names.running, *names.kv_usage}
    values: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:  # by sample name: a counter's family name drops its `_total`
                if sample.name in wanted and math.isfinite(sample.value):
                    values.setdefault(sample.name, []).append(sample.value)
    except IndexError as exc:  # the parser's other way of refusing some malformed lines
        raise ValueError(f"malformed exposition ({exc})") from None
    kv = _first(names.kv_usage, values, max)
    if kv is not None and kv > 1:
        kv = min(kv / 100, 1.0)
    return EngineReading(_first(names.waiting, values, sum), _first(names.running, values, sum), kv, at)


def _first(candidates: tuple[str, ...], values: dict[str, list[float]],
           combine: Callable[[list[float]], float]) -> float | None:
    for name in candidates:
        if name in values:
            return float(combine(values[name]))
    return None


def _parse(body: bytes, names: SignalNames, at: float) -> EngineReading:
    return read_signals(body.decode(), names, at)  # UnicodeDecodeError is a ValueError


class SignalScraper:
    """Scrapes each serving replica's engine every interval_s, off the request path, on a connection of
    its own (supervisor.upstream.fetch over the replica's UpstreamPool, bounded in time to interval_s and in
    size to 4 MiB). A scrape that fails (no answer, non-200, not Prometheus text, none of the names) keeps
    no reading for that replica and is logged once (structlog, event "load_signals_failed", with worker,
    replica and why) until it succeeds again (then "load_signals_ok" once). A reading older than
    3 x interval_s is stale: `reading()` returns None for it."""

    def __init__(self, names: SignalNames, path: str, interval_s: float,
                 targets: Callable[[], Iterable[tuple[Key, UpstreamPool]]]) -> None:
        self.names = names
        self.path = path
        self.interval_s = interval_s
        self._targets = targets
        self._readings: dict[Key, EngineReading] = {}
        self._failing: set[Key] = set()  # failure logged, recovery not yet

    def reading(self, key: Key, now: float) -> EngineReading | None:
        """The replica's latest reading, unless there is none or it is stale at `now`."""
        r = self._readings.get(key)
        if r is None or now - r.at > STALE_INTERVALS * self.interval_s:
            return None
        return r

    def forget(self, key: Key) -> None:
        """The replica restarted or went away: its reading and failure state go with it."""
        self._readings.pop(key, None)
        self._failing.discard(key)

    async def scrape_once(self) -> None:
        """One round over targets(), concurrently."""
        await asyncio.gather(*(self._scrape(key, pool) for key, pool in self._targets()))

    async def run(self) -> None:
        """scrape_once every interval_s until cancelled."""
        while True:
            started = time.monotonic()
            await self.scrape_once()
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def _scrape(self, key: Key, pool: UpstreamPool) -> None:
        try:
            reading = await self._read(pool)
        except _ScrapeFailed as exc:
            if pool.closed:  # that incarnation is gone (restarted or stopped) while we asked it
                return
            self._readings.pop(key, None)
            if key not in self._failing:
                self._failing.add(key)
                log.warning("load_signals_failed", worker=key[0], replica=key[1], why=exc.why)
            return
        if pool.closed:
            return
        self._readings[key] = reading
        if key in self._failing:
            self._failing.discard(key)
            log.info("load_signals_ok", worker=key[0], replica=key[1])

    async def _read(self, pool: UpstreamPool) -> EngineReading:
        try:
            async with asyncio.timeout(self.interval_s):
                status, body = await fetch(pool, self.path, MAX_SCRAPE_BYTES)
        except TimeoutError:
            raise _ScrapeFailed(f"no answer within {self.interval_s}s") from None
        except UpstreamError as exc:
            raise _ScrapeFailed(str(exc)) from None
        at = time.monotonic()
        if status != 200:
            raise _ScrapeFailed(f"answered {status}")
        try:
            # a large text would hold the event loop for milliseconds: parse it in a thread
            reading = await asyncio.to_thread(_parse, body, self.names, at)
        except ValueError as exc:
            raise _ScrapeFailed(f"not Prometheus text: {exc}") from None
        if reading.waiting is None and reading.running is None and reading.kv_usage is None:
            raise _ScrapeFailed("none of the metric names in the answer")
        return reading


class _ScrapeFailed(Exception):
    """A scrape that gave no reading, and why."""

    def __init__(self, why: str):
        self.why = why
        super().__init__(why)
