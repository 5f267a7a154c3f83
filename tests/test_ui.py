"""The live status page: the sample ring, /ui and /ui/samples on a real daemon, and the page in real Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import html.parser
import os
import shutil
import signal
import tempfile
from pathlib import Path

import aiohttp
import pytest

from supervisor.ui import SampleRing, request_rate, run_sampler, sample_from_status
from tests.harness import REPO_ROOT, ctl_command, fast_config, wait_until

ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
TOKEN = "ui-admin-token-42"
ZERO_LINE_Y = 150 - 18  # the charts' x axis in SVG units (height - bottom margin, as in the page's drawChart)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium is not installed "
                                    "(the project's test command installs it): cannot render /ui")


# -- the ring and the sampling, with plain values -----------------------------------------------------------
def test_ring_stays_bounded_whatever_the_uptime():
    ring = SampleRing(capacity=10, interval_s=1)
    for i in range(35):
        ring.push({"t": float(i), "requests_total": i * 3, "queue_depth": 0, "inflight": 0, "gpu": []})
        assert len(ring) == min(i + 1, 10)
    kept = ring.samples()
    assert [s["t"] for s in kept] == [float(i) for i in range(25, 35)]  # the newest, in order
    assert all(s["rate"] == 3.0 for s in kept)


def test_ring_rejects_nonsense():
    with pytest.raises(ValueError):
        SampleRing(capacity=0)
    with pytest.raises(ValueError):
        SampleRing(interval_s=0)


def test_request_rate_from_successive_totals():
    assert request_rate(None, {"t": 1.0, "requests_total": 5}) is None
    assert request_rate({"t": 1.0, "requests_total": 5}, {"t": 3.0, "requests_total": 25}) == 10.0
    assert request_rate({"t": 1.0, "requests_total": 5}, {"t": 1.0, "requests_total": 9}) is None
    # counters started again (a new registry): count from zero rather than go negative
    assert request_rate({"t": 1.0, "requests_total": 50}, {"t": 2.0, "requests_total": 4}) == 4.0


def test_sample_from_both_status_shapes():
    today = {"queue": {"depth": {"high": 1, "low": 2}, "total": 3, "inflight": 2},
             "gpu": {"devices": [{"index": 0, "memory_used_bytes": 5, "memory_total_bytes": 10, "name": "x"}]}}
    assert sample_from_status(today, 7.0, 1.23456) == {
        "t": 1.235, "requests_total": 7.0, "queue_depth": 3, "inflight": 2,
        "gpu": [{"index": 0, "used": 5, "total": 10}]}
    no_total = {"queue": {"depth": {"a": 4, "b": 1}, "inflight": 0}, "gpu": {"available": False, "devices": []}}
    assert sample_from_status(no_total, 0, 0)["queue_depth"] == 5


async def test_sampler_task_fills_the_ring_until_cancelled():
    ring = SampleRing(capacity=4, interval_s=0.01)
    total = {"n": 0.0}

    def read_total() -> float:
        total["n"] += 2
        return total["n"]

    task = asyncio.create_task(run_sampler(ring, lambda: {"queue": {"total": 1, "inflight": 1}}, read_total))
    try:
        await wait_until(lambda: total["n"] >= 20, 10, "ten samples")
        assert len(ring) == 4
        assert all(s["rate"] is not None and s["rate"] > 0 for s in ring.samples()[1:])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.cancelled()


# -- /ui and /ui/samples on a real daemon ---------------------------------------------------------------------
async def load(session: aiohttp.ClientSession, n: int, stop: asyncio.Event | None = None) -> int:
    """Light load: up to `n` requests one after another (the worker echoes); how many got 200."""
    ok = 0
    for _ in range(n):
        if stop is not None and stop.is_set():
            break
        async with session.get("/hello") as r:
            await r.read()
            ok += r.status == 200
    return ok


async def samples(session: aiohttp.ClientSession, url: str, **kw) -> dict:
    async with session.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_page_and_samples_served(supervisor_factory):
    sup = await supervisor_factory(fast_config())
    async with sup.session.get("/ui") as r:
        assert r.status == 200
        assert r.content_type == "text/html"
        page = await r.text()
        csp = r.headers["Content-Security-Policy"]
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["Cache-Control"] == "no-store"
    assert "<script>" in page and "<style>" in page
    own = page.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace is a name, not a fetch
    assert "http://" not in own and "https://" not in own and " src=" not in own  # self-contained: no CDN
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp

    assert await load(sup.session, 30) == 30
    # the daemon's own sampler, every 2 s: wait for a sample that saw those requests
    got = await wait_until(lambda: _sample_with_rate(sup.session, sup.url + "/ui/samples"), 15, "a rate > 0")
    assert got["requests_total"] >= 30
    data = await samples(sup.session, "/ui/samples")
    assert data["capacity"] >= 1 and data["interval_s"] > 0
    ts = [s["t"] for s in data["samples"]]
    assert ts == sorted(ts) and data["now"] >= ts[-1]


async def _sample_with_rate(session: aiohttp.ClientSession, url: str) -> dict | None:
    data = await samples(session, url)
    return next((s for s in data["samples"] if s["rate"]), None)


async def test_token_protects_ui_and_samples(supervisor_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    sup = await supervisor_factory(fast_config(admin={"token_file": str(token_file)}))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/ui", "/ui/samples", "/ui?token=wrong", "/ui/samples?token=" + TOKEN, "/status?token=" + TOKEN):
        async with sup.session.get(path) as r:
            assert r.status == 401, path
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert (await r.json())["error"]["type"] == "unauthorized"
    async with sup.session.get("/ui", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401
    async with sup.session.get("/ui?token=" + TOKEN) as r:  # the page only: to put it in sessionStorage
        assert r.status == 200 and r.content_type == "text/html"
    async with sup.session.get("/ui", headers=bearer) as r:
        assert r.status == 200
    assert "samples" in await samples(sup.session, "/ui/samples", headers=bearer)


async def test_admin_listener_serves_the_page(supervisor_factory):
    sup = await supervisor_factory(fast_config(admin={"listen": {"host": "127.0.0.1", "port": 0}}), wait_ready=False)
    assert sup.admin_port is not None
    admin = f"http://127.0.0.1:{sup.admin_port}"
    async with aiohttp.ClientSession(base_url=admin) as s:
        async with s.get("/ui") as r:
            assert r.status == 200 and r.content_type == "text/html"
        assert "samples" in await samples(s, "/ui/samples")
        async with s.get("/ui/other") as r:
            assert r.status == 400  # not an admin endpoint


# -- the page in a real headless Chromium ---------------------------------------------------------------------
class DomFacts(html.parser.HTMLParser):
    """What the rendered DOM shows: worker rows, state tags, chart attributes and polylines."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.exits: list[dict] = []
        self.svgs: dict[str, dict] = {}
        self.polylines: list[dict] = []
        self.body: dict = {}
        self.badge: dict = {}
        self._svg: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-worker" in a:
            self.rows.append(a)
        elif tag == "tr" and "data-reason" in a:
            self.exits.append(a)
        elif tag == "svg" and a.get("id", "").startswith("chart-"):
            self._svg = a["id"]
            self.svgs[a["id"]] = a
        elif tag == "polyline":
            self.polylines.append({**a, "chart": self._svg})
        elif tag == "body":
            self.body = a
        elif a.get("id") == "badge":
            self.badge = a

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None


async def chromium(url: str, *extra: str, timeout: float = 120) -> str:
    """Run headless Chromium on `url`; its stdout (the DOM with --dump-dom)."""
    profile = tempfile.mkdtemp(prefix="gs-chromium-")
    try:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        return out.decode(errors="replace")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def wait_samples(session: aiohttp.ClientSession, n: int, **kw) -> None:
    async def enough() -> bool:
        return len((await samples(session, "/ui/samples", **kw))["samples"]) >= n
    await wait_until(enough, 30, f"{n} samples in the ring")


@needs_chromium
async def test_chromium_renders_workers_and_charts(supervisor_factory):
    sup = await supervisor_factory(fast_config())
    stop = asyncio.Event()
    loader = asyncio.create_task(load(sup.session, 5000, stop))
    try:
        await wait_samples(sup.session, 3)  # a rate needs two samples; charts want a few points
        dom = await chromium(sup.url + "/ui", "--dump-dom")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "ui.png"
        shot.unlink(missing_ok=True)
        await chromium(sup.url + "/ui", f"--screenshot={shot}", "--window-size=1280,900")
    finally:
        stop.set()
        served = await loader
    assert served > 0

    facts = DomFacts()
    facts.feed(dom)
    assert int(facts.body.get("data-updates", "0")) >= 1, "the page never rendered a /status"
    # under load the one replica is ready or busy (serving either way)
    assert [(r["data-worker"], r["data-state"] in ("ready", "busy")) for r in facts.rows] == [("default", True)]
    pid = str((await sup.status())["worker"]["pid"])
    assert pid in dom
    for chart in ("chart-rate", "chart-queue", "chart-inflight"):
        assert facts.svgs[chart].get("data-drawn") == "1", (chart, facts.svgs.get(chart))
        assert int(facts.svgs[chart]["data-points"]) >= 2
    rate_lines = [p for p in facts.polylines if p["chart"] == "chart-rate"]
    assert rate_lines and len(rate_lines[0]["points"].split()) >= 2
    # requests were flowing, so some point of the rate line is above the zero line (smaller y in SVG)
    ys = [float(pt.split(",")[1]) for pt in rate_lines[0]["points"].split()]
    assert min(ys) < ZERO_LINE_Y, rate_lines[0]["points"]
    assert facts.badge.get("class") == "ready"

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@needs_chromium
async def test_chromium_with_token_in_query_uses_bearer(supervisor_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    sup = await supervisor_factory(fast_config(admin={"token_file": str(token_file)}))
    await wait_samples(sup.session, 2, headers={"Authorization": f"Bearer {TOKEN}"})

    dom = await chromium(f"{sup.url}/ui?token={TOKEN}", "--dump-dom")
    facts = DomFacts()
    facts.feed(dom)
    # /status and /ui/samples only take the header: rows and charts prove the page sent it
    assert [(r["data-worker"], r["data-state"]) for r in facts.rows] == [("default", "ready")]
    assert facts.svgs["chart-queue"].get("data-drawn") == "1"

    denied = await chromium(f"{sup.url}/ui", "--dump-dom")
    assert "unauthorized" in denied and "data-worker" not in denied


@needs_chromium
async def test_chromium_fleet_replica_states_and_exits(supervisor_factory):
    base = fast_config()
    base["worker_defaults"] = {k: v for k, v in base.pop("worker").items() if k != "command"}
    base["workers"] = {"chat": {"command": ctl_command("--name", "chat"), "replicas": 2},
                       "embed": {"command": ctl_command("--name", "embed"), "models": ["embed"], "start": "on_demand"}}
    sup = await supervisor_factory(base)
    victim = (await sup.status())["workers"]["chat"]["replicas"][0]["pid"]
    os.kill(victim, signal.SIGKILL)

    async def respawned() -> dict | None:
        st = await sup.status()
        r0 = st["workers"]["chat"]["replicas"][0]
        return st if r0["state"] == "ready" and r0["pid"] != victim and r0["last_exit"] else None
    st = await wait_until(respawned, 20, "chat replica 0 respawned")

    dom = await chromium(sup.url + "/ui", "--dump-dom")
    facts = DomFacts()
    facts.feed(dom)
    assert [(r["data-worker"], r["data-replica"], r["data-state"]) for r in facts.rows] == [
        ("chat", "0", "ready"), ("chat", "1", "ready"), ("embed", "0", "unloaded")]
    reason = (st.get("exits") or [st["workers"]["chat"]["replicas"][0]["last_exit"]])[-1]["reason"]
    assert reason in [e["data-reason"] for e in facts.exits]


def test_artifacts_dir_is_ignored_by_git():
    assert "tests/artifacts/" in Path(REPO_ROOT / ".gitignore").read_text().split()
