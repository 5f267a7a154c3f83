"""Async jobs in front of the real model_worker (the tiny GPT-2): an error answer fails the job.

A real daemon configured as configs/demo.yaml, its real model_worker, the job store the user gets with
no configuration (SQLite in the state directory) or a real redis-server.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import SupervisorProcess, wait_until
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_model_worker_supervised import supervised, tiny_model  # noqa: F401 - a fixture

pytestmark = pytest.mark.e2e

ASYNC = {"Prefer": "respond-async"}
TOO_LONG = "The cat sat on the mat. " * 400  # thousands of tokens: over the tiny model's 1024


@pytest.fixture(params=["sqlite", "redis"])
async def daemon(request: pytest.FixtureRequest, tiny_model: Path) -> AsyncIterator[SupervisorProcess]:  # noqa: F811
    """The demo policy with the default job store (SQLite), or with jobs in a real redis-server."""
    if request.param == "sqlite":
        async with supervised(str(tiny_model)) as sp:
            yield sp
        return
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    d = Path(tempfile.mkdtemp(prefix="jmw-"))
    redis = RedisServer(d)
    await redis.start()
    try:
        async with supervised(str(tiny_model), jobs={"store": redis.url}) as sp:
            yield sp
    finally:
        await redis.stop()
        shutil.rmtree(d, ignore_errors=True)


async def _job(sp: SupervisorProcess, job_id: str) -> dict:
    async with sp.session.get(f"/jobs/{job_id}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _finished(sp: SupervisorProcess, job_id: str) -> dict:
    async def done() -> dict | None:
        job = await _job(sp, job_id)
        return job if job["status"] not in ("queued", "running") else None
    return await wait_until(done, 120, f"job {job_id} finished")


async def _submit(sp: SupervisorProcess, body: dict) -> str:
    async with sp.session.post("/v1/completions", json=body, headers=ASYNC) as r:
        assert r.status == 202, await r.text()
        return (await r.json())["id"]


async def test_a_job_the_worker_answers_400_is_failed_with_its_error(
        daemon: SupervisorProcess, tiny_model: Path) -> None:  # noqa: F811
    sp = daemon
    bad = await _submit(sp, {"model": tiny_model.name, "prompt": TOO_LONG, "max_tokens": 4})
    good = await _submit(sp, {"model": tiny_model.name, "prompt": "The cat", "max_tokens": 4})

    failed = await _finished(sp, bad)
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "invalid_request_error"          # the worker's OpenAI error type
    assert "maximum context length" in failed["error"]["message"]
    assert failed["result"]["status"] == 400 and failed["attempts"] == 1
    assert (await _finished(sp, good))["status"] == "succeeded"

    async with sp.session.get("/jobs?status=failed") as r:                 # the README's way to find failures
        assert r.status == 200
        listed = [j["id"] for j in (await r.json())["jobs"]]
    assert listed == [bad]
    async with sp.session.get("/jobs?status=succeeded") as r:
        assert [j["id"] for j in (await r.json())["jobs"]] == [good]

    async with sp.session.get(f"/jobs/{bad}/result") as r:                 # the worker's answer, as it gave it
        assert r.status == 400 and r.content_type == "application/json"
        answer = await r.json()
    assert answer["error"]["code"] == "context_length_exceeded" and answer["error"]["param"] == "prompt"
    async with sp.session.get(f"/jobs/{good}/result") as r:
        assert r.status == 200
        assert (await r.json())["object"] == "text_completion"
