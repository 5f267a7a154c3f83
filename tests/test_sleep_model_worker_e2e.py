"""The real built-in model_worker (tiny GPT-2 on CPU) with `sleep:` (level 2) under the real daemon: it is
put to sleep to make room for another worker and wakes answering as before, the same process.

The other worker is a sleepy test worker without sleep mode; 600 MiB each on a 1000 MiB budget (no NVML
here): the two never fit together, the model_worker asleep (10 MiB) beside the other does.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import SupervisorProcess, fast_config, wait_until
from tests.test_model_worker import tiny_model  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e

SLEEPY = str(Path(__file__).resolve().with_name("workers") / "sleepy_worker.py")


def config(model: Path, run_dir: Path) -> dict:
    base = fast_config(runtime_dir=str(run_dir))
    w = base.pop("worker")
    base["worker_defaults"] = {**{k: v for k, v in w.items() if k != "command"}, "startup_timeout_s": 120,
                               "stop_grace_s": 10, "health": {"interval_s": 0.5, "timeout_s": 5, "failures": 3}}
    base["workers"] = {
        "tiny": {"command": ["{python}", "-m", "model_worker", "--socket", "{socket}", "--model", str(model),
                             "--threads", "1"],
                 "models": [model.name], "gpus": [0], "start": "on_demand", "gpu_memory_mb": 600,
                 "min_resident_s": 0,
                 "sleep": {"sleep": "POST /sleep?level=2", "gpu_memory_mb": 10, "host_memory_mb": 10}},
        "other": {"command": [sys.executable, SLEEPY, "--socket", "{socket}", "--name", "other"],
                  "models": ["other"], "gpus": [0], "start": "on_demand", "gpu_memory_mb": 600, "min_resident_s": 0},
    }
    base["gpu"] = {"budget_mb": {0: 1000}, "settle_timeout_s": 0.5, "host_reserve_mb": 0}
    base["queue"] = {"concurrency": 1}
    return base


async def complete(sp: SupervisorProcess, model: str) -> tuple[int, dict]:
    body = {"model": model, "prompt": "The sleeping model", "max_tokens": 8, "temperature": 0}
    async with sp.session.post("/v1/completions", json=body, headers={"X-Request-Timeout": "120"}) as r:
        return r.status, await r.json()


async def replica(sp: SupervisorProcess, worker: str) -> dict:
    return (await sp.status())["workers"][worker]["replicas"][0]


async def test_the_model_worker_sleeps_to_make_room_and_wakes_answering_as_before(tiny_model: Path) -> None:  # noqa: F811
    tmp = Path(tempfile.mkdtemp(prefix="gs-smw-"))
    sp = SupervisorProcess(tmp, config(tiny_model, tmp / "run"))
    try:
        await sp.start(wait_ready=False, timeout=30)
        await wait_until(lambda: _listed(sp), 30, "daemon answering /status")
        code, first = await complete(sp, tiny_model.name)
        assert code == 200, first
        pid = (await replica(sp, "tiny"))["pid"]
        code, other = await complete(sp, "other")  # tiny is idle: put to sleep (level 2), other started
        assert code == 200 and other["worker"] == "other"
        r = await replica(sp, "tiny")
        assert r["state"] == "asleep" and r["pid"] == pid
        code, again = await complete(sp, tiny_model.name)  # woken: the weights read again, the same process
        assert code == 200
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        r = await replica(sp, "tiny")
        assert r["pid"] == pid and r["restarts"] == 0 and r["state"] in ("ready", "busy")
        assert (await replica(sp, "other"))["state"] == "unloaded"  # no sleep mode: stopped for tiny's wake
        m = await sp.metrics()
        assert 'gpu_supervisor_worker_sleeps_total{reason="evicted",worker="tiny"} 1.0' in m
        assert "gpu_supervisor_worker_wake_seconds_count 1.0" in m
    finally:
        await sp.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _listed(sp: SupervisorProcess) -> bool:
    return bool((await sp.status())["workers"])
