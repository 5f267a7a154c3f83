"""On a real GPU (skipped without one): pressure from real NVML readings, and a real CUDA OOM
through the daemon. The suite's only fake is not used here: NVML, torch and the card are real.
"""

from __future__ import annotations

import tempfile

import pytest

from tests.harness import ctl_command, fast_config, wait_until
from tests.workers.util import unix_session


def _gpu() -> tuple[int, int] | None:
    """(used, total) bytes of GPU 0 from real NVML, or None without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
            return int(info.used), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any NVML failure means: no GPU to test on
        return None


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


needs_gpu = pytest.mark.skipif(_gpu() is None or not _cuda(), reason="needs an NVIDIA GPU, NVML and CUDA torch")
pytestmark = [pytest.mark.gpu, needs_gpu]


async def test_worker_filling_the_gpu_goes_soft_hard_then_is_restarted_before_oom(supervisor_factory):
    used, total = _gpu()
    base = used / total
    # thresholds above what the card holds now; the worker then really allocates through them
    soft, hard, critical = base + 0.10, base + 0.20, base + 0.30
    assert critical < 0.99, "the card is too full to run this test"
    step_mb = int(total * 0.05 / (1 << 20))
    run = tempfile.mkdtemp(prefix="gs-gpu-")
    sp = await supervisor_factory(fast_config(
        runtime_dir=run,
        worker={"command": ctl_command(), "health": {"interval_s": 1, "timeout_s": 10, "failures": 3}},
        gpu={"enabled": True, "poll_interval_s": 0.1,
             "thresholds": {"soft": round(soft, 4), "hard": round(hard, 4), "critical": round(critical, 4)},
             "actions": {"soft": {"shed_below": "high"}, "hard": {"pause": True, "cleanup": True},
                         "critical": {"restart_after_s": 0.5}}}))
    st = await sp.status()
    assert st["gpu"]["available"] is True and st["gpu"]["devices"][0]["memory_total_bytes"] == total
    pid = st["worker"]["pid"]
    seen = []
    # straight to the worker's socket: the daemon pauses dispatch under hard pressure
    async with unix_session(f"{run}/worker-1.sock") as w:
        for _ in range(12):
            async with w.get(f"/gpu-alloc?mb={step_mb}") as r:
                assert r.status == 200
                held = (await r.json())["held_bytes"]
            level = await wait_until(lambda: _level_once_seen(sp, held), 10, "a reading that shows the allocation")
            seen.append(level)
            if level == "critical":
                break
    assert "soft" in seen and "hard" in seen and seen[-1] == "critical", seen
    st = await sp.status()
    assert st["gpu"]["worker"]["gpu_memory_bytes"] >= step_mb * (1 << 20)  # the tree's own usage, from NVML
    w = await sp.wait_worker(lambda w: w["pid"] != pid and w["state"] == "ready", 60, "pressure restart")
    assert w["last_exit"]["reason"] == "pressure"  # replaced before any CUDA OOM
    await wait_until(lambda: _level_is(sp, "ok"), 20, "pressure gone with the old worker")
    assert sp.events("worker_cleanup")  # hard called the worker's /cleanup


async def _level_once_seen(sp, held: int) -> str | None:
    """The pressure level, once NVML's reading of the worker's memory includes `held` bytes."""
    gpu = (await sp.status())["gpu"]
    return gpu["pressure"] if (gpu["worker"]["gpu_memory_bytes"] or 0) >= held else None


async def _level_is(sp, level):
    return (await sp.status())["gpu"]["pressure"] == level


async def test_real_cuda_oom_in_model_worker_is_answered_and_the_worker_recovers(supervisor_factory):
    cmd = ["{python}", "-m", "model_worker", "--socket", "{socket}", "--model", "minilm", "--device", "cuda",
           "--cuda-memory-fraction", "0.01", "--embed-batch-size", "1024"]
    sp = await supervisor_factory(fast_config(worker={"command": cmd, "startup_timeout_s": 180},
                                              breaker={"min_calls": 5}))
    async with sp.session.post("/v1/embeddings", json={"input": ["a cat", "a kitten"]}) as r:
        assert r.status == 200
    async with sp.session.post("/v1/embeddings", json={"input": ["word " * 500] * 1024}) as r:
        assert r.status == 503 and r.headers["X-Worker-Error"] == "oom"
    async with sp.session.post("/v1/embeddings", json={"input": ["a cat", "a kitten"]}) as r:
        assert r.status == 200  # the worker freed its cache and serves on, no restart needed
    st = await sp.status()
    assert st["worker"]["restarts"] == 0 and st["breaker"]["state"] == "closed"
    assert st["gpu"]["available"] is True
    assert st["worker"]["gpu_memory_bytes"] > 0


async def test_two_real_model_workers_take_turns_on_one_gpu(supervisor_factory, tmp_path):
    """Two on-demand model_worker replicas on one real GPU with room for one: a real swap, NVML figures
    before and after, and the time it took (printed for the record; never asserted)."""
    import subprocess
    import sys
    import time

    model = tmp_path / "tiny-gpt2"
    subprocess.run([sys.executable, "-m", "model_worker.tiny_model", str(model)], check=True)
    used, total = _gpu()
    mib = 1 << 20
    need_mb = 1500  # declared per replica: more than the tiny model holds with its CUDA context
    budget = used // mib + need_mb + need_mb // 2  # room for one of the two, never both

    def worker(name: str) -> dict:
        return {"command": ["{python}", "-m", "model_worker", "--socket", "{socket}", "--model", str(model),
                            "--device", "cuda"], "models": [name], "gpus": [0], "start": "on_demand",
                "gpu_memory_mb": need_mb, "min_resident_s": 0, "startup_timeout_s": 120}

    cfg = fast_config(runtime_dir=tempfile.mkdtemp(prefix="gs-gpu-"),
                      gpu={"enabled": True, "poll_interval_s": 0.1, "budget_mb": {0: budget}, "settle_timeout_s": 20,
                           "thresholds": {"soft": 0.97, "hard": 0.98, "critical": 0.99}})
    cfg.pop("worker")
    cfg["workers"] = {"a": worker("a"), "b": worker("b")}
    sp = await supervisor_factory(cfg)
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
    async with sp.session.post("/v1/completions", json={**body, "model": "a"}) as r:
        assert r.status == 200, await r.text()
    st = await sp.status()
    a_pid = st["workers"]["a"]["replicas"][0]["pid"]
    await wait_until(lambda: _nvml_holds(a_pid), 20, "NVML sees a's memory")
    t0 = time.monotonic()
    async with sp.session.post("/v1/completions", json={**body, "model": "b"},
                               headers={"X-Request-Timeout": "120"}) as r:
        assert r.status == 200, await r.text()
    swap_s = time.monotonic() - t0
    st = await sp.status()
    assert st["workers"]["a"]["replicas"][0]["state"] == "unloaded"
    assert st["workers"]["a"]["replicas"][0]["last_exit"]["reason"] == "evicted"
    b_pid = st["workers"]["b"]["replicas"][0]["pid"]
    assert not _nvml_holds(a_pid) and _nvml_holds(b_pid)
    print(f"\nGPU swap a -> b: {swap_s:.3f} s; ledger {st['gpu']['ledger']}")


def _nvml_holds(pid: int) -> bool:
    import pynvml

    pynvml.nvmlInit()
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))
        return any(p.pid == pid and (p.usedGpuMemory or 0) > 0 for p in procs)
    finally:
        pynvml.nvmlShutdown()
