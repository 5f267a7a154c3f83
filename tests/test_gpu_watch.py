"""The memory watcher: no-NVML mode on this machine, NVML figures driven through a fake seam,
real processes measured by psutil, a hung NVML call, and (marked gpu) the real driver with torch."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pynvml
import pytest
from structlog.testing import capture_logs

from supervisor.config import Actions, Gpu, HardAction, SoftAction, Thresholds
from supervisor.gpu_watch import GpuWatcher, Nvml, Reading, resolve_devices, visible_tokens
from supervisor.pressure import Level
from tests.fake_nvml import FakeNvml

MIB = 1024 * 1024
GIB = 1024 * MIB
# Host thresholds out of reach, so the real host's memory never moves the level in these tests.
HOST = Thresholds(soft=0.997, hard=0.998, critical=0.999)
FAST = 0.02


def _real_nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


class Harness:
    def __init__(self, watcher: GpuWatcher, task: asyncio.Task[None]):
        self.watcher = watcher
        self.task = task

    async def until(self, pred: Callable[[Reading], bool], timeout: float = 10.0) -> Reading:
        """The first reading (current or later) that satisfies `pred`; fails if the watcher stops."""
        async with asyncio.timeout(timeout):
            last: Reading | None = None
            while True:
                waiter = asyncio.ensure_future(self.watcher.wait_reading(last))
                try:
                    await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if self.task.done():
                    self.task.result()
                    raise AssertionError("the watcher stopped")
                last = waiter.result()
                if pred(last):
                    return last

    async def readings(self, n: int) -> list[Reading]:
        """The next `n` readings."""
        got: list[Reading] = []
        await self.until(lambda r: got.append(r) is None and len(got) > n)
        return got[1:]


@contextlib.asynccontextmanager
async def running(watcher: GpuWatcher) -> AsyncIterator[Harness]:
    task = asyncio.create_task(watcher.run())
    try:
        yield Harness(watcher, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def watcher_with(fake: FakeNvml | None = None, *, gpu: Gpu | None = None,
                 pid: Callable[[], int | None] = lambda: None, **kw: Any) -> GpuWatcher:
    factory = (lambda: fake) if fake is not None else Nvml
    return GpuWatcher(gpu or Gpu(poll_interval_s=FAST), HOST, pid, factory, **kw)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


# ---- no NVML on this machine -------------------------------------------------------------------

no_gpu_here = pytest.mark.skipif(_real_nvml_works(), reason="this machine has a working NVML")


@no_gpu_here
async def test_without_nvml_host_readings_still_flow_and_it_is_logged_once() -> None:
    with capture_logs() as logs:
        async with running(watcher_with(gpu=Gpu(enabled="auto", poll_interval_s=FAST))) as h:
            await h.until(lambda r: bool(events(logs, "nvml_unavailable")))
            later = await h.readings(5)
            status = h.watcher.status()
    [event] = events(logs, "nvml_unavailable")
    assert event["log_level"] == "info"
    assert event["error"] == "NVMLError_LibraryNotFound" and event["reason"]
    assert not h.watcher.available
    for r in later:
        assert not r.available and r.devices == () and r.worker_gpu_memory_bytes is None
        assert r.host_total_bytes == psutil.virtual_memory().total
        assert 0 < r.host_used_bytes < r.host_total_bytes
    assert status["available"] is False and status["devices"] == []
    assert status["pressure"] == "ok" and 0 < status["host"]["ratio"] < 1
    assert not events(logs, "nvml_error")


@no_gpu_here
async def test_enabled_true_without_nvml_serves_but_warns() -> None:
    with capture_logs() as logs:
        async with running(watcher_with(gpu=Gpu(enabled=True, poll_interval_s=FAST))) as h:
            await h.until(lambda r: bool(events(logs, "nvml_unavailable")))
            r = await h.until(lambda r: r.host_total_bytes is not None)
    [event] = events(logs, "nvml_unavailable")
    assert event["log_level"] == "warning"
    assert not r.available


async def test_disabled_never_touches_nvml() -> None:
    def factory() -> Nvml:
        raise AssertionError("NVML touched with gpu.enabled: false")

    with capture_logs() as logs:
        w = GpuWatcher(Gpu(enabled=False, poll_interval_s=FAST), HOST, lambda: None, factory)
        async with running(w) as h:
            r = await h.until(lambda r: r.host_total_bytes is not None)
    assert not r.available and r.devices == ()
    assert events(logs, "nvml_disabled") and not events(logs, "nvml_unavailable")


async def test_init_error_from_the_driver_is_the_no_nvml_mode() -> None:
    fake = FakeNvml()
    fake.init_error = pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with capture_logs() as logs:
        async with running(watcher_with(fake)) as h:
            await h.until(lambda r: bool(events(logs, "nvml_unavailable")))
            await h.readings(3)
    [event] = events(logs, "nvml_unavailable")
    assert event["error"] == "NVMLError_DriverNotLoaded"
    assert fake.init_calls == 1 and fake.shutdown_calls == 0   # init once, nothing to shut down


# ---- NVML figures -> levels --------------------------------------------------------------------

async def test_levels_follow_gpu_memory_with_hysteresis() -> None:
    fake = FakeNvml(total=1000)
    seen: list[Reading] = []
    gpu = Gpu(poll_interval_s=FAST, actions=Actions(soft=SoftAction(shed_below="normal"),
                                                   hard=HardAction(pause=True, cleanup=True)))
    w = watcher_with(fake, gpu=gpu, on_reading=seen.append)
    steps = [  # used/1000 -> level (soft 0.85, hard 0.93, critical 0.97, hysteresis 0.02)
        (500, Level.OK), (860, Level.SOFT), (840, Level.SOFT), (829, Level.OK), (860, Level.SOFT),
        (940, Level.HARD), (980, Level.CRITICAL), (960, Level.CRITICAL), (949, Level.HARD),
        (920, Level.HARD), (901, Level.SOFT), (500, Level.OK),
    ]
    with capture_logs() as logs:
        async with running(w) as h:
            for used, level in steps:
                fake.used[0] = used
                r = await h.until(lambda r: bool(r.devices) and r.devices[0].memory_used_bytes == used)
                assert r.level is level, (used, r.level, level)
                assert w.level is level
                assert w.status()["pressure"] == level.label
                if used == 940:
                    assert w.decision.pause and w.decision.shed_below == "normal"
                if used == 980:
                    assert w.decision.critical_since is not None and not w.decision.restart
    assert seen and all(isinstance(r, Reading) for r in seen)
    changes = [(e["old"], e["new"]) for e in events(logs, "pressure_changed")]
    assert changes == [("ok", "soft"), ("soft", "ok"), ("ok", "soft"), ("soft", "hard"),
                       ("hard", "critical"), ("critical", "hard"), ("hard", "soft"), ("soft", "ok")]


async def test_cleanup_is_decided_once_on_entering_hard() -> None:
    fake = FakeNvml(total=1000)
    decisions = []
    w = watcher_with(fake, on_reading=lambda r: decisions.append(w.decision))
    async with running(w) as h:
        fake.used[0] = 950
        await h.until(lambda r: r.level is Level.HARD)
        await h.readings(3)
    hard = [d for d in decisions if d.level is Level.HARD]
    assert len(hard) >= 4 and [d.cleanup for d in hard].count(True) == 1 and hard[0].cleanup


async def test_status_block() -> None:
    fake = FakeNvml(devices=2, total=1000)
    fake.used[:] = [100, 900]
    async with running(watcher_with(fake)) as h:
        await h.until(lambda r: len(r.devices) == 2)
        s = h.watcher.status()
    assert s["available"] is True and s["pressure"] == "soft" and s["stale"] is False
    assert s["devices"][1] == {"index": 1, "name": "Fake GPU 1", "memory_used_bytes": 900,
                               "memory_total_bytes": 1000, "utilization": 0.4, "temperature_c": None}
    assert set(s["host"]) == {"used_bytes", "total_bytes", "ratio"}
    assert s["worker"] == {"rss_bytes": None, "gpu_memory_bytes": None}


async def test_figures_a_device_does_not_give_are_missing_not_a_failure() -> None:
    fake = FakeNvml(total=1000)
    fake.procs[0] = None                    # no process list (temperature: not supported either)
    async with running(watcher_with(fake, pid=os.getpid)) as h:
        r = await h.until(lambda r: bool(r.devices))
    assert r.available and r.devices[0].temperature_c is None
    assert r.worker_gpu_memory_bytes == 0


# ---- the worker's process tree, real processes --------------------------------------------------

GRANDCHILD = "b = b'x' * (50 << 20); print('ready', flush=True); import sys; sys.stdin.read()"


async def test_worker_tree_rss_and_gpu_memory_of_real_processes() -> None:
    # The worker (a python that only starts another) and its child, which holds 50 MiB.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {GRANDCHILD!r}])",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            assert (await proc.stdout.readline()).strip() == b"ready"
        [grandchild] = psutil.Process(proc.pid).children(recursive=True)
        fake = FakeNvml(total=10 * GIB)
        fake.procs[0] = [(grandchild.pid, 300 * MIB), (proc.pid, None), (1, 5 * GIB)]
        pid: int | None = proc.pid
        async with running(watcher_with(fake, pid=lambda: pid)) as h:
            r = await h.until(lambda r: r.worker_rss_bytes is not None and bool(r.devices))
            root_rss = psutil.Process(proc.pid).memory_info().rss
            assert r.worker_rss_bytes >= 50 * MIB
            assert r.worker_rss_bytes >= root_rss + 45 * MIB          # the grandchild counted
            assert r.worker_rss_bytes < 50 * MIB + 300 * MIB
            assert r.worker_gpu_memory_bytes == 300 * MIB               # pid 1's memory is not the worker's
            assert h.watcher.status()["worker"]["rss_bytes"] == r.worker_rss_bytes

            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 30)
            gone = await h.until(lambda r: r.worker_rss_bytes is None)   # vanished: nothing to measure
            assert gone.worker_gpu_memory_bytes == 0
            pid = None
            none = await h.until(lambda r: r.worker_gpu_memory_bytes is None)
            assert none.worker_rss_bytes is None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- a hung NVML call --------------------------------------------------------------------------

def nvml_stalls(logs: list[dict[str, Any]]) -> list[str]:
    """The nvml part's stalled/resumed events, checked to alternate: one log line per episode.

    (On a loaded machine a merely slow poll is an episode too, so counting would be flaky.)
    """
    seq = [e["event"] for e in logs if e.get("part") == "nvml"]
    assert all(a != b for a, b in zip(seq, seq[1:])), seq
    assert seq[:1] in ([], ["gpu_poll_stalled"]), seq
    return seq


async def test_a_hung_nvml_call_does_not_stall_the_loop() -> None:
    fake = FakeNvml(total=1000)
    fake.used[0] = 600
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    gate = threading.Event()
    beat = asyncio.create_task(heartbeat())
    try:
        with capture_logs() as logs:
            async with running(watcher_with(fake)) as h:
                fresh = await h.until(lambda r: r.available and bool(r.devices))
                fake.gate = gate
                await h.until(lambda r: fake.entered.is_set())
                fake.used[0] = 900          # not seen while the call hangs
                ticks_at_hang = ticks
                stale = await h.readings(4)
                assert all(r.stale for r in stale[1:])
                assert all(r.devices == fresh.devices for r in stale[1:])     # the last reading kept
                assert all(r.host_used_bytes is not None for r in stale)      # host figures still flow
                assert ticks > ticks_at_hang and not gate.is_set()            # others ran meanwhile
                assert h.watcher.level is Level.OK
                # Logged once, however many ticks it hangs.
                assert nvml_stalls(logs)[-1] == "gpu_poll_stalled"

                fake.gate = None
                gate.set()
                after = await h.until(lambda r: not r.stale and r.devices[0].memory_used_bytes == 900)
                assert after.level is Level.SOFT
        assert nvml_stalls(logs)[-2:] == ["gpu_poll_stalled", "gpu_poll_resumed"]
    finally:
        gate.set()
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat


async def test_cancel_while_a_call_hangs_returns_promptly() -> None:
    fake = FakeNvml()
    gate = threading.Event()
    try:
        w = GpuWatcher(Gpu(poll_interval_s=FAST), HOST, lambda: None, lambda: fake, shutdown_timeout_s=0.05)
        with capture_logs() as logs:
            async with running(w) as h:
                await h.until(lambda r: r.available)
                fake.gate = gate
                await h.until(lambda r: r.stale)
        assert events(logs, "nvml_shutdown_timeout")     # owner got control back; thread is a daemon
    finally:
        gate.set()


async def test_a_slow_init_keeps_host_readings_flowing() -> None:
    fake = FakeNvml()
    fake.init_gate = gate = threading.Event()
    try:
        with capture_logs() as logs:
            async with running(watcher_with(fake)) as h:
                early = await h.readings(3)
                assert all(not r.available and not r.stale and r.host_used_bytes for r in early)
                gate.set()
                await h.until(lambda r: r.available and bool(r.devices))
        seq = [e["event"] for e in logs if e.get("part") == "nvml_init"]
        assert seq == ["gpu_poll_stalled", "gpu_poll_resumed"]
        assert fake.init_calls == 1
    finally:
        gate.set()


def test_the_supervisor_side_imports_no_torch() -> None:
    code = ("import sys, supervisor.gpu_watch, supervisor.pressure; "
            "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- NVML errors mid-run -----------------------------------------------------------------------

async def test_nvml_error_mid_run_then_recovery() -> None:
    fake = FakeNvml(total=1000)
    fake.used[0] = 950
    with capture_logs() as logs:
        async with running(watcher_with(fake)) as h:
            await h.until(lambda r: r.available and r.level is Level.HARD)
            fake.fail = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            down = await h.until(lambda r: not r.available)
            assert down.devices == () and down.worker_gpu_memory_bytes is None
            assert not h.watcher.status()["available"]
            more = await h.readings(4)
            assert not any(r.available for r in more)
            fake.fail = None
            back = await h.until(lambda r: r.available)
            assert back.devices[0].memory_used_bytes == 950
    [err] = events(logs, "nvml_error")
    assert err["error"] == "NVMLError_GpuIsLost" and err["log_level"] == "warning"
    assert len(events(logs, "nvml_recovered")) == 1
    assert fake.shutdown_calls == 1 and fake.init_calls == 1


async def test_nvml_is_shut_down_on_cancel() -> None:
    fake = FakeNvml()
    async with running(watcher_with(fake)) as h:
        await h.until(lambda r: r.available)
        assert fake.shutdown_calls == 0
    assert fake.shutdown_calls == 1


# ---- CUDA_VISIBLE_DEVICES ----------------------------------------------------------------------

def test_visible_tokens() -> None:
    assert visible_tokens({}) is None
    assert visible_tokens({"CUDA_VISIBLE_DEVICES": ""}) == ()
    assert visible_tokens({"CUDA_VISIBLE_DEVICES": " 2, 0 "}) == ("2", "0")
    assert visible_tokens({"CUDA_VISIBLE_DEVICES": "GPU-ab12,1"}) == ("GPU-ab12", "1")


def test_resolve_devices() -> None:
    uuids = ["GPU-aaaa-1", "GPU-bbbb-2", "GPU-bbbc-3", "GPU-cccc-4"]
    uuid_of = uuids.__getitem__
    assert resolve_devices(None, 4, uuid_of) == (0, 1, 2, 3)
    assert resolve_devices((), 4, uuid_of) == ()
    assert resolve_devices(("2", "0"), 4, uuid_of) == (2, 0)
    assert resolve_devices(("0", "7", "1"), 4, uuid_of) == (0,)          # CUDA stops at the first bad one
    assert resolve_devices(("-1",), 4, uuid_of) == ()
    assert resolve_devices(("1", "1"), 4, uuid_of) == (1,)
    assert resolve_devices(("GPU-cccc", "GPU-aaaa-1"), 4, uuid_of) == (3, 0)
    assert resolve_devices(("GPU-bbb",), 4, uuid_of) == ()               # ambiguous prefix
    assert resolve_devices(("MIG-1234",), 4, uuid_of) == (0, 1, 2, 3)    # cannot map: watch all
    assert resolve_devices(("nonsense", "1"), 4, uuid_of) == ()


async def test_the_worker_env_picks_the_watched_devices() -> None:
    fake = FakeNvml(devices=4, total=1000)
    fake.used[:] = [10, 20, 990, 40]
    w = watcher_with(fake, worker_env={"CUDA_VISIBLE_DEVICES": "1,3"})
    async with running(w) as h:
        r = await h.until(lambda r: bool(r.devices))
        assert [d.index for d in r.devices] == [1, 3] and r.level is Level.OK   # device 2 is not the worker's
        w.set_worker_env({"CUDA_VISIBLE_DEVICES": "GPU-00000002"})
        r = await h.until(lambda r: [d.index for d in r.devices] == [2])
        assert r.level is Level.CRITICAL
        w.set_worker_env({"CUDA_VISIBLE_DEVICES": ""})                          # e.g. the CPU fallback
        r = await h.until(lambda r: r.devices == ())
        assert r.available and r.level is Level.OK
        w.set_worker_env({})
        await h.until(lambda r: len(r.devices) == 4)


# ---- the real driver (needs a GPU) -------------------------------------------------------------

def _cuda_or_skip() -> Any:
    if not _real_nvml_works():
        pytest.skip("NVML is not available (no NVIDIA driver/GPU)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


@pytest.mark.gpu
async def test_real_nvml_sees_what_torch_allocates() -> None:
    torch = _cuda_or_skip()
    torch.ones(1, device="cuda")             # the CUDA context first, so it is in the baseline
    torch.cuda.synchronize()
    env = {k: v for k, v in os.environ.items() if k == "CUDA_VISIBLE_DEVICES"}
    # This test process plays the worker.
    w = GpuWatcher(Gpu(enabled=True, poll_interval_s=0.05), HOST, os.getpid, worker_env=env)
    with capture_logs() as logs:
        async with running(w) as h:
            before = await h.until(lambda r: r.available and bool(r.devices))
            await h.readings(2)
            before = h.watcher.reading
            base = sum(d.memory_used_bytes for d in before.devices)
            block = torch.empty(GIB, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
            after = await h.until(lambda r: sum(d.memory_used_bytes for d in r.devices) >= base + 0.9 * GIB)
            used = sum(d.memory_used_bytes for d in after.devices)
            assert used <= base + 1.5 * GIB
            d = after.devices[0]
            assert d.name and d.memory_total_bytes >= d.memory_used_bytes > 0
            assert d.utilization is None or 0.0 <= d.utilization <= 1.0
            if before.worker_gpu_memory_bytes:   # NVML lists this pid (not so across pid namespaces)
                assert after.worker_gpu_memory_bytes >= before.worker_gpu_memory_bytes + 0.9 * GIB
            del block
            torch.cuda.empty_cache()
            await h.until(lambda r: sum(d.memory_used_bytes for d in r.devices) < base + 0.5 * GIB)
    assert events(logs, "nvml_ready") and not events(logs, "nvml_unavailable")
    assert not events(logs, "nvml_error")
