"""On a real GPU (skipped without one): what the built-in worker's sleep gives back on the card, read
from NVML, and how long a wake takes beside a cold start (recorded, not asserted)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.test_model_worker import CUDA, PYTHON, ROOT, running

# A random GPT-2 big enough for its weights to stand out from the CUDA context on NVML's figures:
# 4 layers of 1024 wide, about 52M parameters, 0.2 GB in float32.
MODEL_ARGS = ("--n-layer", "4", "--n-embd", "1024", "--n-head", "16", "--n-positions", "1024")
GREEDY = {"prompt": "Hello world", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def _nvml_ready() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any NVML failure means: no GPU to test on
        return False


pytestmark = [pytest.mark.e2e, pytest.mark.gpu,
              pytest.mark.skipif(not CUDA or not _nvml_ready(), reason="needs a CUDA GPU and NVML")]


def _gpu_memory(pid: int) -> tuple[int, str]:
    """(bytes, what was read): the process's own GPU memory when NVML lists it, else the device's used
    memory (a container's pid namespace can hide the process from NVML; the worker is alone on it)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory), "process"
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used), "device"
    finally:
        pynvml.nvmlShutdown()


async def _post(http: aiohttp.ClientSession, path: str, body: Any = None) -> tuple[int, Any, float]:
    started = time.monotonic()
    async with http.post(path, json=body) as r:
        return r.status, await r.json(), time.monotonic() - started


@pytest.fixture(scope="module")
def gpt2_200mb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("models") / "gpt2-200mb"
    subprocess.run([PYTHON, "-m", "model_worker.tiny_model", str(dest), *MODEL_ARGS], cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
                   check=True)
    return dest


async def test_sleep_gives_the_weights_back_to_the_gpu_and_wakes(gpt2_200mb: Path, tmp_path: Path,
                                                                 record_property: Any) -> None:
    async with running(tmp_path, "--model", str(gpt2_200mb), "--device", "cuda") as worker, \
            worker.session() as http:
        status, before, _ = await _post(http, "/v1/completions", GREEDY)
        assert status == 200
        async with http.get("/is_sleeping") as r:
            awake = await r.json()
        assert awake["weights"]["device"] == "cuda:0"
        weights_bytes = awake["weights"]["parameters"] * 4  # float32
        assert weights_bytes > 150 << 20
        pid = worker.proc.pid
        used_awake, read = _gpu_memory(pid)

        figures: dict[str, Any] = {"cold_start_s": round(worker.ready_s, 3), "nvml_reading": read,
                                   "weights_mb": weights_bytes >> 20, "awake_mb": used_awake >> 20}
        for level in (1, 2):
            status, slept, sleep_s = await _post(http, f"/sleep?level={level}")
            assert status == 200 and slept["is_sleeping"] is True
            assert slept["weights"]["device"] == ("cpu" if level == 1 else None)
            used_asleep, _ = _gpu_memory(pid)
            async with http.get("/memory") as r:
                torch_figures = (await r.json())["cuda"][0]
            # the weights left the card: NVML sees most of them gone, torch's allocator holds almost nothing
            assert used_asleep < used_awake - weights_bytes // 2, (used_awake, used_asleep, weights_bytes)
            assert torch_figures["reserved_bytes"] < weights_bytes // 4  # cuBLAS workspaces may stay

            status, woke, wake_s = await _post(http, "/wake_up")
            assert status == 200 and woke["is_sleeping"] is False and woke["weights"]["device"] == "cuda:0"
            used_woken, _ = _gpu_memory(pid)
            assert used_woken > used_asleep + weights_bytes // 2, (used_asleep, used_woken, weights_bytes)
            status, after, _ = await _post(http, "/v1/completions", GREEDY)
            assert status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]
            figures[f"level{level}"] = {"sleep_s": round(sleep_s, 3), "wake_s": round(wake_s, 3),
                                        "asleep_mb": used_asleep >> 20, "woken_mb": used_woken >> 20}
    for key, value in figures.items():
        record_property(key, value)
    print("sleep/wake on the GPU:", figures)
