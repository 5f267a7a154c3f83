"""The Grafana dashboard in deploy/grafana: well formed, and every query answered by a real Prometheus."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.cog.runtime import UnknownDataquery
from grafana_foundation_sdk.models import dashboard as gdash
from grafana_foundation_sdk.models import loki as gloki
from grafana_foundation_sdk.models import prometheus as gprom

from tests.harness import REPO_ROOT, fast_config, free_port, wait_until
from tests.otlp_receiver import OtlpReceiver

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "gpu-supervisor.json"
SCALED_OBJECT = REPO_ROOT / "deploy" / "kubernetes" / "scaledobject.yaml"
DATASOURCES = REPO_ROOT / "deploy" / "grafana" / "datasources.yaml"
DATASOURCE_UID = "${datasource}"
LOGS_UID = "${logs}"
RATE_WINDOW = "30s"

# The metric families of the contract (DESIGN "Metrics", "Fleet", "Async jobs"), as Prometheus names them.
DOCUMENTED_METRICS = {
    "requests_total", "request_duration_seconds", "queue_wait_seconds", "queue_depth", "inflight",
    "rejected_total", "retries_total", "worker_up", "worker_state", "worker_restarts_total",
    "worker_start_seconds", "worker_rss_bytes", "worker_gpu_memory_bytes", "worker_unloads_total",
    "breaker_state", "breaker_transitions_total", "gpu_memory_used_bytes", "gpu_memory_total_bytes",
    "gpu_memory_reserved_bytes", "gpu_utilization_ratio", "pressure_level", "pressure_actions_total",
    "degraded", "config_reloads_total", "config_generation", "event_loop_lag_seconds", "jobs_total",
    "jobs_pending", "jobs_store_errors_total", "trace_export_errors_total",
}
# What the issue asks the dashboard to show.
REQUIRED_METRICS = {
    "requests_total", "request_duration_seconds", "queue_depth", "inflight", "rejected_total", "worker_state",
    "worker_restarts_total", "gpu_memory_used_bytes", "gpu_memory_reserved_bytes", "pressure_level",
    "breaker_state", "jobs_total",
}
# Panels that must show data for a daemon with one healthy worker under load, today and with the fleet labels.
PANELS_WITH_DATA = (
    "Request rate", "Queued", "In flight", "Replicas up", "Up by replica",
    "Requests by code and worker", "Latency p50 / p99 by priority", "Rejections by reason",
    "Queue depth by priority and worker", "In flight by replica", "Replicas by state", "Breakers by state",
    "Daemon file descriptors", "Daemon CPU and memory",
)
# Label-agnostic queries (valid for today's unlabelled metrics and the fleet's worker/replica labels).
CORE_QUERIES = (
    f"sum(rate(gpu_supervisor_requests_total[{RATE_WINDOW}]))",
    "sum(gpu_supervisor_queue_depth)",
    "sum(gpu_supervisor_inflight)",
    "sum(gpu_supervisor_worker_up)",
    f"histogram_quantile(0.99, sum by (le) (rate(gpu_supervisor_request_duration_seconds_bucket[{RATE_WINDOW}])))",
)
METRIC_RE = re.compile(r"\bgpu_supervisor_([a-z_]+)")
HIST_SUFFIX = re.compile(r"_(bucket|sum|count)$")

STRUCTURE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["type", "id", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer"},
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"], "properties": {
                    "w": {"type": "integer", "minimum": 1, "maximum": 24},
                    "x": {"type": "integer", "minimum": 0, "maximum": 23},
                    "h": {"type": "integer", "minimum": 1}, "y": {"type": "integer", "minimum": 0}}},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["collapsed", "panels"]},
            "else": {"if": {"properties": {"type": {"const": "logs"}}}, "then": {
                # the access log from Loki: its trace ids link to traces (the Loki source's derived field)
                "required": ["datasource", "targets", "options"],
                "properties": {
                    "datasource": {"const": {"type": "loki", "uid": LOGS_UID}},
                    "targets": {"type": "array", "minItems": 1, "items": {
                        "type": "object",
                        "required": ["expr", "refId", "datasource"],
                        "properties": {"expr": {"type": "string", "pattern": "trace_id"},
                                       "datasource": {"const": {"type": "loki", "uid": LOGS_UID}}},
                    }},
                    "options": {"type": "object", "properties": {"enableLogDetails": {"const": True}}},
                },
            }, "else": {
                "required": ["datasource", "targets", "fieldConfig", "options"],
                "properties": {
                    "datasource": {"const": {"type": "prometheus", "uid": DATASOURCE_UID}},
                    "targets": {"type": "array", "minItems": 1, "items": {
                        "type": "object",
                        "required": ["expr", "refId", "datasource"],
                        "properties": {"expr": {"type": "string", "pattern": "gpu_supervisor_"},
                                       "refId": {"type": "string", "pattern": "^[A-Z]$"},
                                       "datasource": {"const": {"type": "prometheus", "uid": DATASOURCE_UID}}},
                    }},
                },
            }},
        }},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {
            "type": "array",
            "contains": {"type": "object", "required": ["name", "type", "query"],
                         "properties": {"name": {"const": "datasource"}, "type": {"const": "datasource"},
                                        "query": {"const": "prometheus"}}},
        }}},
    },
}


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> list[dict]:
    """Every panel, the ones inside collapsed rows too."""
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def targets(d: dict, kind: str = "prometheus") -> list[tuple[str, dict]]:
    """(panel title, target) of every query to a data source of this `kind`."""
    return [(p["title"], t) for p in panels(d) for t in p.get("targets", []) if t["datasource"]["type"] == kind]


def concrete(expr: str) -> str:
    """A dashboard query as Grafana would send it: interval macros filled, every variable at "All" (.*)."""
    expr = expr.replace("$__rate_interval", RATE_WINDOW).replace("$__interval", RATE_WINDOW)
    expr = expr.replace("${__rate_interval}", RATE_WINDOW).replace("${__interval}", RATE_WINDOW)
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


def metric_families(expr: str) -> set[str]:
    return {HIST_SUFFIX.sub("", m) for m in METRIC_RE.findall(expr)}


def sdk_round_trip(d: dict) -> tuple[gdash.Dashboard, list[str]]:
    """Load the JSON into the Grafana Foundation SDK's models and report every key or value they do not keep."""
    register_default_plugins()
    model = gdash.Dashboard.from_json(copy.deepcopy(d))
    back = json.loads(json.dumps(model, cls=JSONEncoder))
    problems: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict):
            if not isinstance(b, dict):
                problems.append(f"{path}: not an object in the model")
                return
            for k, v in a.items():
                if k not in b:
                    problems.append(f"{path}.{k}: unknown to the dashboard model")
                else:
                    walk(v, b[k], f"{path}.{k}")
        elif isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                problems.append(f"{path}: list not kept")
                return
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            problems.append(f"{path}: {a!r} became {b!r}")

    walk(d, back, "")
    return model, problems


# --- structure


def test_dashboard_loads_into_the_grafana_sdk_models_unchanged(dash):
    model, problems = sdk_round_trip(dash)
    assert not problems, "\n".join(problems)
    # every query was read as a Prometheus query and every panel type is one Grafana knows
    flat = [p for p in model.panels or [] if isinstance(p, gdash.Panel)]
    for row in model.panels or []:
        if isinstance(row, gdash.RowPanel):
            flat.extend(row.panels)
    assert flat
    for p in flat:
        assert p.targets, p.title
        for t in p.targets:
            kind = gloki.Dataquery if p.type_val == "logs" else gprom.Dataquery
            assert isinstance(t, kind) and not isinstance(t, UnknownDataquery), p.title
        assert type(p.options).__module__ != "builtins", f"{p.title}: panel type {p.type_val} unknown to the SDK"


def test_sdk_round_trip_catches_a_misspelt_key(dash):
    broken = copy.deepcopy(dash)
    first = next(p for p in broken["panels"] if p["type"] != "row")
    first["gridpos"] = first.pop("gridPos")
    first["targets"][0]["legend"] = "{{code}}"
    _, problems = sdk_round_trip(broken)
    assert any("gridpos" in p for p in problems) and any(".legend" in p for p in problems), problems


def test_dashboard_structure(dash):
    jsonschema.validate(dash, STRUCTURE_SCHEMA)
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels(dash)]
    assert len(titles) == len(set(titles)), "panel titles must be unique (they name the panels in tests and links)"
    for p in panels(dash):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} overflows the 24-column grid"
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), f"{p['title']}: duplicate refId"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name, v in variables.items():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == DATASOURCE_UID
            assert v.get("includeAll") and v.get("allValue") == ".*", \
                f"${name}: 'All' must be .* so series without that label (a single-worker daemon) still match"
    # every variable a query uses is defined
    for title, t in targets(dash) + targets(dash, "loki"):
        for used in re.findall(r"\$\{?([A-Za-z_]\w*)\}?", t["expr"]):
            assert used.startswith("__") or used in variables, f"{title}: ${used} is not a dashboard variable"


def test_dashboard_covers_the_contract_metrics(dash):
    used = set().union(*(metric_families(t["expr"]) for _, t in targets(dash)))
    assert used <= DOCUMENTED_METRICS, f"not in the metrics contract: {used - DOCUMENTED_METRICS}"
    assert REQUIRED_METRICS <= used, f"missing from the dashboard: {REQUIRED_METRICS - used}"
    exprs = [t["expr"] for _, t in targets(dash)]
    assert any("histogram_quantile(0.5," in e and "request_duration_seconds_bucket" in e for e in exprs)
    assert any("histogram_quantile(0.99," in e and "request_duration_seconds_bucket" in e for e in exprs)


def test_legends_name_labels_the_query_keeps(dash):
    for title, t in targets(dash):
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
        kept = set()
        for group in re.findall(r"\bby\s*\(([^)]*)\)", t["expr"]):
            kept |= {x.strip() for x in group.split(",") if x.strip()}
        assert legend_labels <= kept - {"le"}, f"{title}: legend {legend_labels} but the query keeps {kept}"


def test_every_query_parses_with_promtool(dash, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package prometheus; apt-get install -y prometheus)")
    rules = [{"record": f"dashboard:query:{i}", "expr": concrete(t["expr"])} for i, (_, t) in enumerate(targets(dash))]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # and promtool does reject a broken query (so the pass above means something)
    broken = {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(a[30s])"}]}]}
    path.write_text(yaml.safe_dump(broken))
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0


# --- a real Prometheus scraping a real daemon


class Prometheus:
    """A real `prometheus` server on 127.0.0.1 with a temporary config and TSDB."""

    def __init__(self, binary: str, tmp: Path, target: str):
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "gpu-supervisor", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)

    def log_tail(self) -> str:
        self.log.flush()
        return (self.tmp / "prometheus.log").read_text(errors="replace")[-3000:]

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log_tail()}")
        try:
            async with session.get(f"{self.url}/-/ready") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def query(self, session: aiohttp.ClientSession, expr: str) -> dict:
        async with session.post(f"{self.url}/api/v1/query", data={"query": expr}) as r:
            body = await r.json()
        return body

    async def value(self, session: aiohttp.ClientSession, expr: str) -> float | None:
        body = await self.query(session, expr)
        assert body["status"] == "success", (expr, body)
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus binary not found (Debian package prometheus; apt-get install -y prometheus)")
    return found


async def drive_load(session: aiohttp.ClientSession, stop: asyncio.Event, counts: collections.Counter,
                     lane: int, max_requests: int = 20000) -> None:
    """Light traffic: mixed priorities, every tenth request with an invalid X-Priority (rejected with 400)."""
    priorities = [None, "critical", "high", "normal", "low", "1"]
    for i in range(max_requests):
        if stop.is_set():
            return
        headers = {}
        if i % 10 == 9:
            headers["X-Priority"] = "urgent-please"
        elif priorities[(i + lane) % len(priorities)]:
            headers["X-Priority"] = priorities[(i + lane) % len(priorities)]
        path = "/work?ms=20" if (i + lane) % 3 else "/hello"
        async with session.get(path, headers=headers) as r:
            await r.read()
            counts[r.status] += 1
        # pace the load (a light, steady stream), ending as soon as the test is done
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)


async def test_every_dashboard_query_runs_on_real_prometheus(supervisor_factory, prometheus_binary, tmp_path, dash):
    sp = await supervisor_factory(fast_config(queue={"concurrency": 2}))
    prom = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{sp.port}")
    stop = asyncio.Event()
    counts: collections.Counter = collections.Counter()
    assert sp.session is not None
    loaders = [asyncio.create_task(drive_load(sp.session, stop, counts, lane)) for lane in range(3)]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await wait_until(lambda: prom.ready(http), 60, "prometheus /-/ready")

            async def scraped_under_load() -> bool:
                up = await prom.value(http, 'count_over_time(up{job="gpu-supervisor"}[5m])')
                ok = await prom.value(
                    http, f'sum(increase(gpu_supervisor_requests_total{{code="200"}}[{RATE_WINDOW}]))')
                bad = await prom.value(
                    http, f'sum(increase(gpu_supervisor_rejected_total{{reason="bad_request"}}[{RATE_WINDOW}]))')
                return bool(up and up >= 5 and ok and bad)

            await wait_until(scraped_under_load, 90, "prometheus to scrape the daemon a few times under load",
                             interval=0.5)
            assert await prom.value(http, 'max(up{job="gpu-supervisor"})') == 1.0, prom.log_tail()

            failures, empty = [], []
            results: dict[tuple[str, str], list[dict]] = {}
            for title, t in targets(dash):
                expr = concrete(t["expr"])
                body = await prom.query(http, expr)
                if body.get("status") != "success":
                    failures.append(f"{title} [{t['refId']}]: {expr}: {body.get('error')}")
                    continue
                results[(title, t["refId"])] = body["data"]["result"]
                if title in PANELS_WITH_DATA and not body["data"]["result"]:
                    empty.append(f"{title} [{t['refId']}]: {expr}")
            assert not failures, "queries Prometheus refused:\n" + "\n".join(failures)
            assert not empty, "core panels without data:\n" + "\n".join(empty)
            assert {title for title, _ in results} >= set(PANELS_WITH_DATA)

            # the panels show what the traffic did
            by_code = {s["metric"].get("code"): float(s["value"][1])
                       for s in results[("Requests by code and worker", "A")]}
            assert by_code.get("200", 0) > 0 and by_code.get("400", 0) > 0, by_code
            rejections = {s["metric"].get("reason"): float(s["value"][1])
                          for s in results[("Rejections by reason", "A")]}
            assert rejections.get("bad_request", 0) > 0, rejections
            latencies = [float(s["value"][1]) for s in results[("Latency p50 / p99 by priority", "B")]]
            assert any(0 < v < float("inf") for v in latencies), latencies
            states = {s["metric"].get("gpu_supervisor_worker_state"): float(s["value"][1])
                      for s in results[("Replicas by state", "A")]}
            assert states.get("ready", 0) + states.get("busy", 0) >= 1, states

            # label-agnostic core queries, and the query KEDA scales on
            keda_query = yaml.safe_load(SCALED_OBJECT.read_text())["spec"]["triggers"][0]["metadata"]["query"]
            for expr in (*CORE_QUERIES, keda_query):
                body = await prom.query(http, expr)
                assert body["status"] == "success" and body["data"]["result"], (expr, body)
    finally:
        stop.set()
        await asyncio.gather(*loaders, return_exceptions=True)
        prom.stop()
    assert counts[200] > 0 and counts[400] > 0, counts


async def test_daemon_metrics_pass_promtool(supervisor_factory):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package prometheus; apt-get install -y prometheus)")
    sp = await supervisor_factory(fast_config())
    assert sp.session is not None
    for headers in ({}, {"X-Priority": "high"}, {"X-Priority": "nope"}):
        async with sp.session.get("/hello", headers=headers) as r:
            await r.read()
    text = await sp.metrics()
    assert "gpu_supervisor_requests_total" in text
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"promtool check metrics: {res.stdout}{res.stderr}"


# --- logs: a trace id in an access log line links to its trace


def test_an_access_log_lines_trace_id_links_to_its_trace(dash):
    sources = {s["uid"]: s for s in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert sources["prometheus"]["type"] == variables["datasource"]["query"] == "prometheus"
    assert sources["loki"]["type"] == variables["logs"]["query"] == "loki"
    (derived,) = sources["loki"]["jsonData"]["derivedFields"]
    # the link goes to a trace store by the trace id the regex captures (`$$`: a literal `$` in provisioning)
    assert sources[derived["datasourceUid"]]["type"] in ("jaeger", "tempo")
    assert derived["url"] == "$${__value.raw}" and re.compile(derived["matcherRegex"]).groups == 1
    (panel,) = [p for p in panels(dash) if p["type"] == "logs"]
    assert panel["datasource"]["uid"] == "${logs}" and panel["options"]["enableLogDetails"]
    assert 'event="request"' in panel["targets"][0]["expr"]


async def test_the_derived_field_finds_the_trace_id_in_the_daemons_real_access_log(supervisor_factory):
    derived = yaml.safe_load(DATASOURCES.read_text())["datasources"][1]["jsonData"]["derivedFields"][0]
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with OtlpReceiver() as rx:
        sp = await supervisor_factory(fast_config(tracing={"endpoint": rx.endpoint},
                                                  logging={"format": "json", "level": "info", "access": True}))
        async with sp.session.get("/hello", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}) as r:
            assert r.status == 200
        await sp.wait_log("request", path="/hello")
        lines = [ln for ln in sp.raw_lines if '"event": "request"' in ln and "/hello" in ln]
        assert [m.group(1) for ln in lines if (m := re.search(derived["matcherRegex"], ln))] == [trace_id]
        # tracing off: no trace_id field, nothing to link
        sp.config.pop("tracing")
        sp.write_config(sp.config)
        sp.signal(signal.SIGHUP)
        await sp.wait_log("tracing", endpoint=None)
        async with sp.session.get("/hello?off", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}) as r:
            assert r.status == 200
        off = await sp.wait_log("request", path="/hello", count=2)
        assert "trace_id" not in off
