"""Routing by the OpenAI `model` in front of the REAL built-in worker: names declared or discovered, the
daemon's own model list and model cards, and the warning when a worker does not serve what is declared.

Real daemons, real `python -m model_worker` processes (the tiny GPT-2 and MiniLM) over real Unix sockets,
the official `openai` client. The configs are the README's fleet example (models and paths substituted).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, fast_config, wait_until

pytestmark = pytest.mark.e2e

START_TIMEOUT = 180.0  # two or three models load at once on two shared cores


def model_worker(model: str, *args: str) -> list[str]:
    """The README's command; `--threads 1` only spares the shared test machine's cores."""
    return ["{python}", "-m", "model_worker", "--socket", "{socket}", "--model", model, *args, "--threads", "1"]


def fleet_config(workers: dict, routes: list[dict] | None = None) -> dict:
    base = fast_config()
    base.pop("worker")
    base["worker_defaults"] = {"startup_timeout_s": START_TIMEOUT, "stop_grace_s": 10,
                               # generous: the inference threads and other tests share two cores
                               "health": {"interval_s": 0.5, "timeout_s": 5, "failures": 3}}
    base["workers"] = workers
    if routes:
        base["routes"] = routes
    return base


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    subprocess.run([sys.executable, "-m", "model_worker.tiny_model", str(dest)], cwd=REPO_ROOT,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, timeout=300, check=True)
    return dest


def requests_of(metrics: str, worker: str, code: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("gpu_supervisor_requests_total{") and f'worker="{worker}"' in line \
                and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _listed(sp) -> dict[str, str]:
    async with sp.session.get("/v1/models") as r:
        return {m["id"]: m["worker"] for m in (await r.json())["data"]} if r.status == 200 else {}


async def test_discovered_models_route_by_the_body_model(supervisor_factory, tiny_model: Path):
    # the README's fleet example with `models:` left out: each worker's names come from its GET /v1/models
    cfg = fleet_config({
        "chat": {"command": model_worker(str(tiny_model)), "gpus": [0]},
        "embed": {"command": model_worker("minilm", "--task", "embed"), "gpus": [0], "concurrency": 4},
    })
    sp = await supervisor_factory(cfg, wait_ready=False)
    await sp.wait_ready(START_TIMEOUT)
    await wait_until(lambda: _listed(sp), 10, "GET /v1/models answered by the daemon")
    assert await _listed(sp) == {"tiny-gpt2": "chat", "minilm": "embed"}
    s = sp.session

    async with s.post("/v1/embeddings", json={"model": "minilm", "input": ["a cat", "a kitten"]}) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert [len(d["embedding"]) for d in body["data"]] == [384, 384]
    async with s.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "Hello", "max_tokens": 3}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["choices"][0]["text"] is not None
    async with s.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}) as r:
        assert r.status == 404
        err = (await r.json())["error"]
    assert err["type"] == "model_not_found" and err["code"] == "model_not_found"
    assert "minilm" in err["message"] and "tiny-gpt2" in err["message"]
    m = await sp.metrics()
    assert requests_of(m, "embed", "200") == 1 and requests_of(m, "chat", "200") == 1
    assert requests_of(m, "chat", "400") == 0


async def test_the_readme_fleet_example_serves_its_declared_names(supervisor_factory, tiny_model: Path):
    import openai

    cfg = fleet_config({
        # as the README prints it: the worker answers to the declared name because --model-name says so
        "chat": {"command": model_worker(str(tiny_model), "--model-name", "llama-8b"), "models": ["llama-8b"],
                 "gpus": [0]},
        "embed": {"command": model_worker("minilm", "--task", "embed"), "models": ["all-MiniLM-L6-v2"],
                  "gpus": [0], "concurrency": 4},
        # the README's example before: a declared name the worker does not answer to (it knows its folder's)
        "legacy": {"command": model_worker(str(tiny_model)), "models": ["org/legacy-gpt2"]},
    }, routes=[{"path": "/v1/embeddings", "worker": "embed", "priority": "high"}])
    sp = await supervisor_factory(cfg, wait_ready=False)
    await sp.wait_ready(START_TIMEOUT)

    async def checked() -> dict | None:
        workers = (await sp.status())["workers"]
        missing = {name: w["models_missing"] for name, w in workers.items()}
        return missing if None not in missing.values() else None

    missing = await wait_until(checked, 20, "each worker's declared names checked against its GET /v1/models")
    # all-MiniLM-L6-v2 is an alias MiniLM's worker accepts (GET /v1/models/{id}) without listing it
    assert missing == {"chat": [], "embed": [], "legacy": ["org/legacy-gpt2"]}
    warned = sp.events("models_mismatch", worker="legacy")
    assert warned and warned[0]["missing"] == ["org/legacy-gpt2"] and warned[0]["level"] == "warning"
    assert not sp.events("models_mismatch", worker="chat") and not sp.events("models_mismatch", worker="embed")

    async with openai.AsyncOpenAI(base_url=f"{sp.url}/v1", api_key="x", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="llama-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert completion.choices[0].message.role == "assistant"
        emb = await client.embeddings.create(model="all-MiniLM-L6-v2", input=["a cat"], encoding_format="float")
        assert len(emb.data[0].embedding) == 384

        # GET /v1/models/{id}: the daemon's own card, the same as the list's entry
        listed = {m.id: m for m in (await client.models.list()).data}
        assert set(listed) == {"llama-8b", "all-MiniLM-L6-v2", "org/legacy-gpt2"}
        card = await client.models.retrieve("llama-8b")
        assert card.model_dump() == listed["llama-8b"].model_dump()
        assert card.owned_by == "chat" and card.model_extra["status"] == "loaded"
        card = await client.models.retrieve("org/legacy-gpt2")  # an id with `/` (sent as %2F)
        assert card.id == "org/legacy-gpt2" and card.model_extra["worker"] == "legacy"
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("gpt-5")
        assert caught.value.code == "model_not_found"
    async with sp.session.get("/v1/models/org/legacy-gpt2") as r:  # the same id, `/` unencoded
        assert r.status == 200 and (await r.json())["id"] == "org/legacy-gpt2"
