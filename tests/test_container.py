"""The container image (Containerfile, DESIGN "Container image") built and run for real with podman.

scripts/build-image.sh builds it on a local Debian base (mmdebstrap, no registry) with torch's CPU wheel
from this machine's pip find-links directory; the image then runs its own policy (configs/container.yaml,
only the port changed: the container shares the host's network) in front of the tiny GPT-2 mounted at
/model. scripts/test.sh installs podman, runc and mmdebstrap.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from openai import AsyncOpenAI

from tests.harness import PYTHON, REPO_ROOT, free_port, pid_alive, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.container]

CONTAINERS_CONF = REPO_ROOT / "deploy" / "container" / "containers.conf"
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"localhost/gpu-supervisor:{VERSION}"
OWNER_LABEL = "io.gpu-supervisor.test-owner"  # the pid of the pytest that started the container
IMAGE_UID = 10001
BUILD_TIMEOUT_S = 1200  # a cold build: the base image, pip downloading transformers & co.
START_TIMEOUT_S = 180   # the daemon and the worker's model load on a loaded machine
CONTEXT = 2048
# tokens of each request held across the stop: seconds of generation (the queued one's all come after
# SIGTERM), within the worker's default --max-tokens-limit (2048)
LONG = 2000
DRAIN_S = 240           # the test's drain.timeout_s: a loaded machine generates 2 x LONG tokens slowly


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One podman command (with this repo's containers.conf); fails the test on a non-zero exit."""
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env())
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


async def apodman(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """podman without blocking the event loop (a stream is being read meanwhile): (code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec("podman", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=podman_env())
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def remove_leftovers() -> None:
    """Containers an earlier, killed test run left (their pytest is gone); those of a live run are kept."""
    r = podman("ps", "--all", "--filter", f"label={OWNER_LABEL}", "--format", "json")
    for c in json.loads(r.stdout or "[]"):
        owner = (c.get("Labels") or {}).get(OWNER_LABEL, "")
        if not (owner.isdigit() and pid_alive(int(owner))):
            podman("rm", "--force", "--time", "0", c["Id"], check=False)


def cpu_wheels() -> Path:
    """The local directory holding torch's CPU wheel (this machine's pip find-links): the build must not
    download the multi-GB CUDA build from PyPI."""
    r = subprocess.run([PYTHON, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True)
    where = Path(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None
    assert where is not None and any(where.glob("torch-*+cpu-*.whl")), (
        f"no torch CPU wheel in pip's find-links ({where}): the image build would download torch's CUDA build")
    return where


@pytest.fixture(scope="module")
def image() -> str:
    """The image as scripts/build-image.sh builds it (layers and the local base are reused when cached)."""
    assert shutil.which("podman"), "podman is not installed: scripts/test.sh installs it (apt-get install podman)"
    env = {**podman_env(), "WHEELS": str(cpu_wheels()), "IMAGE": IMAGE}
    env.pop("BASE", None)
    r = subprocess.run([str(REPO_ROOT / "scripts" / "build-image.sh")], cwd=REPO_ROOT, env=env, text=True,
                       capture_output=True, timeout=BUILD_TIMEOUT_S)
    assert r.returncode == 0, f"build-image.sh exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    torch = podman("run", "--rm", "--network=none", "--entrypoint", "python", IMAGE, "-c",
                   "import importlib.metadata as m; print(m.version('torch'))").stdout.strip()
    assert torch.endswith("+cpu"), f"the image has torch {torch}, not the CPU wheel"
    return IMAGE


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    # wider than the default tiny model (about 3 s for LONG tokens on an idle machine, not 1 s): the drain
    # test needs a generation long enough to see one request queued behind it and stop the container
    subprocess.run([PYTHON, "-m", "model_worker.tiny_model", str(dest), "--n-positions", str(CONTEXT),
                    "--n-layer", "4", "--n-embd", "256"], cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    # the container's user (uid 10001) reads it through the bind mount
    for p in (dest, *dest.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


@dataclass
class Running:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return podman("logs", "--tail", "30", self.name, check=False).stdout


@pytest.fixture(scope="module")
def container(image: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The image running its own policy (configs/container.yaml: only the port changed, and the drain, the
    queue wait and the routes' deadlines long enough for a loaded machine, where LONG tokens can take over
    a minute) with the tiny model at /model, on the host's network."""
    remove_leftovers()
    policy = yaml.safe_load((REPO_ROOT / "configs" / "container.yaml").read_text())
    port = free_port()
    policy["listen"]["port"] = port
    policy["drain"]["timeout_s"] = DRAIN_S
    policy["queue"]["timeout_s"] = DRAIN_S
    for route in policy["routes"]:
        if route.get("timeout_s") is not None:
            route["timeout_s"] = 2 * DRAIN_S
    policy_file = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    policy_file.chmod(0o644)
    name = f"gs-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--label", f"{OWNER_LABEL}={os.getpid()}", "--network=host",
           "--volume", f"{tiny_model}:/model:ro", "--volume", f"{policy_file}:/etc/gpu-supervisor/policy.yaml:ro",
           image)
    try:
        yield Running(name, port)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


async def wait_ready(c: Running) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        async def ready() -> bool:
            try:
                async with s.get(f"{c.url}/readyz") as r:
                    return r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                code, out, _ = await apodman("inspect", "--format", "{{.State.Running}}", c.name)
                assert code == 0 and out.strip() == "true", f"the container stopped:\n{c.logs()}"
                return False
        await wait_until(ready, START_TIMEOUT_S, "the container's /readyz 200", interval=0.5)


async def test_the_image_serves_the_model_as_a_non_root_user_and_is_healthy(container: Running) -> None:
    await wait_ready(container)
    client = AsyncOpenAI(base_url=f"{container.url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        answer = await client.completions.create(model="model", prompt="The cat", max_tokens=5, temperature=0,
                                                 extra_body={"ignore_eos": True})
    finally:
        await client.close()
    assert answer.choices[0].finish_reason == "length" and answer.usage is not None
    assert answer.usage.completion_tokens == 5

    code, out, err = await apodman("exec", container.name, "id", "-u")
    assert code == 0 and out.strip() == str(IMAGE_UID), (out, err)
    # every process in the container, the daemon and its worker included, runs as the image's user
    code, out, err = await apodman("top", container.name, "user", "pid", "args")
    assert code == 0, err
    rows = [line.split(None, 2) for line in out.strip().splitlines()[1:]]
    assert rows and {user for user, _, _ in rows} == {"gpu-supervisor"}, out
    commands = [args for _, _, args in rows]
    assert any("gpu-supervisor run --config /etc/gpu-supervisor/policy.yaml" in a for a in commands), out
    assert any("-m model_worker" in a for a in commands), out
    assert [args for _, pid, args in rows if pid == "1"][0].startswith("/usr/bin/tini --"), out

    # the image's HEALTHCHECK (GET /readyz on the policy's port) passes
    code, out, err = await apodman("healthcheck", "run", container.name)
    assert code == 0, (out, err)
    code, out, _ = await apodman("inspect", "--format", "{{.State.Health.Status}}", container.name)
    assert out.strip() == "healthy", out


async def test_kill_hup_1_reloads_the_policy_through_tini(container: Running) -> None:
    """A reload as deploy/kubernetes does it: `kill -HUP 1` reaches the daemon through tini (PID 1)."""
    await wait_ready(container)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        async def generation() -> int:
            async with s.get(f"{container.url}/status") as r:
                return (await r.json())["config"]["generation"]
        before = await generation()
        code, out, err = await apodman("exec", container.name, "kill", "-HUP", "1")
        assert code == 0, (out, err)

        async def reloaded() -> bool:
            return await generation() > before
        await wait_until(reloaded, 30, "the config's generation to grow")


async def test_podman_stop_drains_the_requests_held_and_exits_0(container: Running) -> None:
    """One request generating and one queued behind it (concurrency 1) when SIGTERM comes: both get
    their whole answer, then the container exits 0 by itself."""
    await wait_ready(container)
    client = AsyncOpenAI(base_url=f"{container.url}/v1", api_key="unused", max_retries=0, timeout=DRAIN_S)

    async def complete() -> list:
        stream = await client.completions.create(
            model="model", prompt="Hello", max_tokens=LONG, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        return [chunk async for chunk in stream]

    status_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    sent: list[asyncio.Task] = []

    async def held() -> bool:
        """One generating and at least one queued. A generation takes about a second on an idle machine, and
        a loaded one can delay this client's next request by as much: when nothing is queued and at most one
        request is out, one more is sent, so that moment comes whatever the speeds."""
        for t in sent:
            if t.done() and t.exception() is not None:
                raise AssertionError(f"a request failed before podman stop: {t.exception()!r}")
        async with status_session.get(f"{container.url}/status") as r:
            q = (await r.json())["queue"]
        if q["inflight"] == 1 and q["total"] >= 1:
            return True
        if q["total"] == 0 and sum(not t.done() for t in sent) <= 1:
            assert len(sent) < 20, "no request was ever seen queued behind one generating"
            sent.append(asyncio.create_task(complete()))
        return False

    async def draining() -> bool:
        async with status_session.get(f"{container.url}/readyz") as r:
            return r.status == 503

    stopper: asyncio.Task | None = None
    try:
        sent.append(asyncio.create_task(complete()))
        await wait_until(held, DRAIN_S / 2, "one request generating and one queued", interval=0.05)
        # podman stop sends the image's STOPSIGNAL (SIGTERM), and SIGKILL only after --time seconds
        stopper = asyncio.create_task(apodman("stop", "--time", str(DRAIN_S + 60), container.name,
                                              timeout=DRAIN_S + 90))
        await wait_until(draining, 30, "/readyz 503 (draining) after podman stop", interval=0.05)
        assert not sent[-1].done(), "the queued request was answered before the daemon drained: LONG is too short"
        answers = await asyncio.wait_for(asyncio.gather(*sent), DRAIN_S)
        code, _, err = await stopper
    finally:
        for t in (*sent, stopper):
            if t is not None:
                t.cancel()
        await status_session.close()
        await client.close()
    assert code == 0, err
    for chunks in answers:  # each request held got its whole answer...
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == LONG
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # ...and the container ended by itself, with the daemon's exit code
    state = json.loads(podman("inspect", "--format", "{{json .State}}", container.name).stdout)
    assert state["Status"] == "exited" and state["ExitCode"] == 0 and not state["OOMKilled"], (state,
                                                                                              container.logs())


def test_the_health_check_fails_when_nothing_answers(tmp_path: Path) -> None:
    policy = yaml.safe_load((REPO_ROOT / "configs" / "container.yaml").read_text())
    policy["listen"]["port"] = free_port()
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    r = subprocess.run([sys.executable, "-m", "supervisor.healthcheck", "--config", str(tmp_path / "policy.yaml")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "unhealthy" in r.stdout, (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "-m", "supervisor.healthcheck", "--config", str(tmp_path / "missing.yaml")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing.yaml" in r.stderr, (r.stdout, r.stderr)
