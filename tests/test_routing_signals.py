"""Engine load signals: each preset read from Prometheus text as the engine exposes it, and the scraper
against real aiohttp servers on real Unix sockets (answers, failures logged once, recovery, staleness)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from supervisor.routing.signals import (
    MAX_SCRAPE_BYTES,
    PRESETS,
    EngineReading,
    SignalNames,
    SignalScraper,
    read_signals,
    signal_names,
)
from supervisor.upstream import UpstreamPool
from tests.harness import wait_until

# vLLM (v1 engine): every series labelled by model_name and data-parallel engine; two served names here.
VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_running{engine="0",model_name="llama-8b-chat"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
vllm:num_requests_waiting{engine="0",model_name="llama-8b-chat"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
vllm:kv_cache_usage_perc{engine="0",model_name="llama-8b-chat"} 0.17
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 6.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 9.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 9.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.7
"""

# vLLM before the rename: the KV gauge under its old name.
VLLM_OLD_TEXT = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Meta-Llama-3-8B"} 12.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="meta-llama/Meta-Llama-3-8B"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="meta-llama/Meta-Llama-3-8B"} 0.93
"""

SGLANG_TEXT = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 8.128902e+06
# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
# HELP sglang:num_running_reqs The number of running requests
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 162.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 2826.0
"""

TGI_TEXT = """\
# HELP tgi_request_count Total number of requests
# TYPE tgi_request_count counter
tgi_request_count 17
# HELP tgi_queue_size Current queue size
# TYPE tgi_queue_size gauge
tgi_queue_size 4
# HELP tgi_batch_current_size Current batch size
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 8
# HELP tgi_batch_current_max_tokens Maximum tokens for the current batch
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 4096
"""

# llama-server --metrics as current builds serve it: no KV-cache gauge any more.
LLAMACPP_TEXT = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 143
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 22.7
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""

# builds from before the KV-cache fields left /metrics
LLAMACPP_OLD_EXTRA = """\
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.63
# HELP llamacpp:kv_cache_tokens KV-cache tokens.
# TYPE llamacpp:kv_cache_tokens gauge
llamacpp:kv_cache_tokens 1290
"""

VLLM = PRESETS["vllm"]


# -- read_signals ------------------------------------------------------------------------------------

def test_vllm_counts_sum_over_label_sets_and_kv_takes_the_fullest() -> None:
    r = read_signals(VLLM_TEXT, VLLM, at=12.5)
    assert r == EngineReading(waiting=7.0, running=4.0, kv_usage=0.42, at=12.5)


def test_older_vllm_is_read_under_its_old_kv_name() -> None:
    r = read_signals(VLLM_OLD_TEXT, VLLM, at=0.0)
    assert (r.waiting, r.running, r.kv_usage) == (0.0, 12.0, 0.93)


def test_the_newer_name_wins_when_both_are_exposed() -> None:
    both = VLLM_TEXT + 'vllm:gpu_cache_usage_perc{engine="0",model_name="llama-8b-chat"} 0.99\n'
    assert read_signals(both, VLLM, at=0.0).kv_usage == 0.42


def test_sglang() -> None:
    r = read_signals(SGLANG_TEXT, PRESETS["sglang"], at=1.0)
    assert (r.waiting, r.running, r.kv_usage) == (2826.0, 162.0, 0.28)


def test_tgi_has_no_kv_usage() -> None:
    r = read_signals(TGI_TEXT, PRESETS["tgi"], at=1.0)
    assert (r.waiting, r.running, r.kv_usage) == (4.0, 8.0, None)


def test_llamacpp_current_build_reads_no_kv_and_an_older_one_does() -> None:
    names = PRESETS["llamacpp"]
    current = read_signals(LLAMACPP_TEXT, names, at=1.0)
    assert (current.waiting, current.running, current.kv_usage) == (1.0, 2.0, None)
    older = read_signals(LLAMACPP_TEXT + LLAMACPP_OLD_EXTRA, names, at=1.0)
    assert (older.waiting, older.running, older.kv_usage) == (1.0, 2.0, 0.63)


def test_explicit_names_override_the_preset() -> None:
    names = signal_names("vllm", None, "vllm:num_preemptions_total", None)
    assert names == SignalNames(VLLM.waiting, ("vllm:num_preemptions_total",), VLLM.kv_usage)
    r = read_signals(VLLM_TEXT, names, at=0.0)
    assert (r.waiting, r.running, r.kv_usage) == (7.0, 6.0, 0.42)  # a counter, found by its sample name
    assert signal_names("sglang", "q", "r", "k") == SignalNames(("q",), ("r",), ("k",))
    assert signal_names("none", "q", None, None) == SignalNames(waiting=("q",))
    assert signal_names("tgi", None, None, None) == PRESETS["tgi"]


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown load_signals preset 'triton'"):
        signal_names("triton", None, None, None)


def test_a_percent_style_kv_gauge_is_brought_to_a_share() -> None:
    text = "# HELP engine_kv_percent KV cache used\n# TYPE engine_kv_percent gauge\nengine_kv_percent 87.5\n"
    r = read_signals(text, SignalNames(kv_usage=("engine_kv_percent",)), at=0.0)
    assert r.kv_usage == pytest.approx(0.875)


def test_absent_and_non_finite_values_read_none() -> None:
    text = ('# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine="0",model_name="m"} NaN\n'
            "# TYPE process_open_fds gauge\nprocess_open_fds 12\n")
    assert read_signals(text, VLLM, at=3.0) == EngineReading(None, None, None, 3.0)
    assert read_signals("", VLLM, at=3.0) == EngineReading(None, None, None, 3.0)


@pytest.mark.parametrize("text", [
    "<html><body><h1>404 Not Found</h1></body></html>\n",
    '{"object": "error", "message": "Not Found"}\n',
    "Internal Server Error",
    'vllm:num_requests_waiting{model_name="m" 3\n',
    '{+=, =\tE_u\n\\.10,\t\t{-"_}_,',  # the parser fails this one with an IndexError of its own
])
def test_text_that_is_not_prometheus_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        read_signals(text, VLLM, at=0.0)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='a{}"=, \n#\\:_0.1eE+-TYPEgauge\t', max_size=40))
def test_any_text_gives_a_reading_or_a_value_error(text: str) -> None:
    try:
        read_signals(text, SignalNames(("a",), ("a_total",), ("e",)), at=0.0)
    except ValueError:
        pass


# -- SignalScraper against real servers ----------------------------------------------------------------

class Engine:
    """A /metrics endpoint on a Unix socket; `mode` says how it answers: ok, 500, close, garbage, hang."""

    def __init__(self, sock: Path, text: str = VLLM_TEXT):
        self.sock = sock
        self.text = text
        self.mode = "ok"
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.pool = UpstreamPool(str(sock))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.asked.set()
        if self.mode == "500":
            return web.Response(status=500, text="Internal Server Error")
        if self.mode == "close":
            assert request.transport is not None
            request.transport.close()
        elif self.mode == "garbage":
            return web.Response(text="<html><body>metrics are disabled</body></html>", content_type="text/html")
        elif self.mode == "hang":
            await self.release.wait()
        return web.Response(text=self.text, content_type="text/plain", charset="utf-8")


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator:
    """Starts Engines on real sockets; all are stopped at the end."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(name: str, text: str = VLLM_TEXT) -> Engine:
            engine = Engine(tmp_path / f"{name}.sock", text)
            app = web.Application()
            app.router.add_get("/metrics", engine.handle)
            runner = web.AppRunner(app)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            stack.callback(engine.release.set)  # a hung answer ends before its server does
            stack.callback(engine.pool.close)
            await web.UnixSite(runner, str(engine.sock)).start()
            return engine
        yield start


def events(logs: list[dict], name: str) -> list[tuple[str, int]]:
    return [(e["worker"], e["replica"]) for e in logs if e["event"] == name]


async def test_readings_appear_failures_are_logged_once_and_recovery_is_logged(serve, tmp_path: Path) -> None:
    ok = await serve("ok")
    err = await serve("err")
    err.mode = "500"
    closing = await serve("close")
    closing.mode = "close"
    garbage = await serve("garbage")
    garbage.mode = "garbage"
    unnamed = await serve("unnamed", TGI_TEXT)  # an engine that is not the preset's
    nobody = UpstreamPool(str(tmp_path / "nobody.sock"))
    targets = [(("chat", 0), ok.pool), (("chat", 1), err.pool), (("chat", 2), closing.pool),
               (("chat", 3), garbage.pool), (("chat", 4), unnamed.pool), (("chat", 5), nobody)]
    scraper = SignalScraper(VLLM, "/metrics", 5.0, lambda: targets)

    with capture_logs() as logs:
        await scraper.scrape_once()
        await scraper.scrape_once()
    r = scraper.reading(("chat", 0), now=time.monotonic())
    assert r is not None and (r.waiting, r.running, r.kv_usage) == (7.0, 4.0, 0.42)
    for i in range(1, 6):
        assert scraper.reading(("chat", i), now=r.at) is None
    failed = [e for e in logs if e["event"] == "load_signals_failed"]
    assert sorted((e["worker"], e["replica"]) for e in failed) == [("chat", i) for i in range(1, 6)]  # once each
    why = {e["replica"]: e["why"] for e in failed}
    assert why[1] == "answered 500"
    assert why[2].startswith("reset")
    assert why[3].startswith("not Prometheus text")
    assert why[4] == "none of the metric names in the answer"
    assert why[5].startswith("connect")
    assert all(e["log_level"] == "warning" for e in failed)
    assert events(logs, "load_signals_ok") == []

    err.mode = "ok"
    with capture_logs() as logs:
        await scraper.scrape_once()
        await scraper.scrape_once()
    assert scraper.reading(("chat", 1), now=r.at) is not None
    assert events(logs, "load_signals_ok") == [("chat", 1)]
    assert events(logs, "load_signals_failed") == []

    ok.mode = "500"  # a replica that had a reading loses it with its first failure
    with capture_logs() as logs:
        await scraper.scrape_once()
    assert scraper.reading(("chat", 0), now=r.at) is None
    assert events(logs, "load_signals_failed") == [("chat", 0)]


async def test_run_follows_the_engine(serve) -> None:
    engine = await serve("e", SGLANG_TEXT)
    scraper = SignalScraper(PRESETS["sglang"], "/metrics", 0.05, lambda: [(("chat", 0), engine.pool)])
    task = asyncio.create_task(scraper.run())
    try:
        def now_waiting() -> float | None:
            r = scraper.reading(("chat", 0), time.monotonic())
            return None if r is None else r.waiting

        await wait_until(lambda: now_waiting() == 2826.0, what="the first reading")
        engine.text = SGLANG_TEXT.replace("2826.0", "3.0")
        await wait_until(lambda: now_waiting() == 3.0, what="a later reading")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_reading_goes_stale_and_forget_drops_it(serve) -> None:
    engine = await serve("e")
    scraper = SignalScraper(VLLM, "/metrics", 0.5, lambda: [(("chat", 0), engine.pool)])
    await scraper.scrape_once()
    r = scraper.reading(("chat", 0), now=time.monotonic())
    assert r is not None
    assert scraper.reading(("chat", 0), now=r.at + 1.5) == r  # 3 x interval_s: still fresh
    assert scraper.reading(("chat", 0), now=r.at + 1.6) is None
    assert scraper.reading(("chat", 0), now=r.at + 3600) is None

    scraper.forget(("chat", 0))
    assert scraper.reading(("chat", 0), now=r.at) is None

    engine.mode = "500"  # forget also clears the failure state: the next failure is logged again
    with capture_logs() as logs:
        await scraper.scrape_once()
        scraper.forget(("chat", 0))
        await scraper.scrape_once()
    assert events(logs, "load_signals_failed") == [("chat", 0), ("chat", 0)]


async def test_an_engine_that_does_not_answer_is_given_up_after_interval_s(serve) -> None:
    engine = await serve("e")
    engine.mode = "hang"
    scraper = SignalScraper(VLLM, "/metrics", 0.1, lambda: [(("chat", 0), engine.pool)])
    with capture_logs() as logs:
        async with asyncio.timeout(10):  # a guard for a broken bound, not the assertion
            await scraper.scrape_once()
    assert engine.asked.is_set()
    failed = [e for e in logs if e["event"] == "load_signals_failed"]
    assert [e["why"] for e in failed] == ["no answer within 0.1s"]
    assert scraper.reading(("chat", 0), now=time.monotonic()) is None


async def test_an_answer_over_4_mib_is_refused(serve) -> None:
    padding = "# HELP filler " + "x" * 1000 + "\n"
    engine = await serve("e", VLLM_TEXT + padding * (MAX_SCRAPE_BYTES // len(padding) + 1))
    scraper = SignalScraper(VLLM, "/metrics", 5.0, lambda: [(("chat", 0), engine.pool)])
    with capture_logs() as logs:
        await scraper.scrape_once()
    assert [e["why"] for e in logs if e["event"] == "load_signals_failed"] == [
        f"protocol: answer over {MAX_SCRAPE_BYTES} bytes"]
    engine.text = VLLM_TEXT
    await scraper.scrape_once()
    assert scraper.reading(("chat", 0), now=time.monotonic()) is not None


async def test_a_scrape_of_an_incarnation_that_ends_meanwhile_leaves_nothing(serve) -> None:
    engine = await serve("e")
    engine.mode = "hang"
    scraper = SignalScraper(VLLM, "/metrics", 5.0, lambda: [(("chat", 0), engine.pool)])
    with capture_logs() as logs:
        scrape = asyncio.create_task(scraper.scrape_once())
        await asyncio.wait_for(engine.asked.wait(), 10)
        engine.pool.close()  # the replica restarted: its old pool is closed, its key forgotten
        scraper.forget(("chat", 0))
        await scrape
    assert logs == []
    assert scraper.reading(("chat", 0), now=time.monotonic()) is None
