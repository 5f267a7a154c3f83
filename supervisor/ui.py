"""The live status page: `GET /ui` (one self-contained HTML page) and `GET /ui/samples` (its sample ring).

The page polls `/status` and `/ui/samples` every 2 s and draws SVG charts of the last minutes.
Both paths are protected like /status. A browser cannot send a Bearer header when it opens a page,
so `/ui` (the page only, never the data) also accepts the admin token as `?token=`: the page moves
it into sessionStorage at once, removes it from the address bar, and sends it as
`Authorization: Bearer` on its own fetches. The page is sent with `Referrer-Policy: no-referrer`
and `Cache-Control: no-store`, and the daemon writes no access log, so the query token does not
travel further than the browser tab. Reopen `/ui?token=...` after closing the tab.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections import deque
from collections.abc import Callable

import structlog
from aiohttp import web

from .errors import error_response

log = structlog.get_logger("supervisor.ui")

PATHS = ("/ui", "/ui/samples")
SAMPLE_INTERVAL_S = 2.0
SAMPLE_CAPACITY = 300  # 10 minutes at one sample every 2 s, whatever the uptime


class SampleRing:
    """The last `capacity` samples `{t, requests_total, rate, queue_depth, inflight, gpu}`; older ones fall off."""

    def __init__(self, capacity: int = SAMPLE_CAPACITY, interval_s: float = SAMPLE_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        if capacity < 1 or interval_s <= 0:
            raise ValueError("SampleRing needs capacity >= 1 and interval_s > 0")
        self.capacity = capacity
        self.interval_s = interval_s
        self._clock = clock
        self._t0 = clock()
        self._samples: deque[dict] = deque(maxlen=capacity)

    def now(self) -> float:
        """Seconds since the ring was made: the time base of every sample's `t`."""
        return self._clock() - self._t0

    def __len__(self) -> int:
        return len(self._samples)

    def push(self, sample: dict) -> dict:
        """Add a sample, with its request rate computed from the previous sample's total."""
        prev = self._samples[-1] if self._samples else None
        sample = {**sample, "rate": request_rate(prev, sample)}
        self._samples.append(sample)
        return sample

    def samples(self) -> list[dict]:
        return list(self._samples)

    def to_json(self) -> dict:
        return {"interval_s": self.interval_s, "capacity": self.capacity, "now": round(self.now(), 3),
                "samples": self.samples()}


def request_rate(prev: dict | None, cur: dict) -> float | None:
    """Requests per second between two samples; None for the first one. A total that went down
    (counters reset) counts from zero."""
    if prev is None:
        return None
    dt = cur["t"] - prev["t"]
    if dt <= 0:
        return None
    done = cur["requests_total"] - prev["requests_total"]
    if done < 0:
        done = cur["requests_total"]
    return round(done / dt, 3)


def sample_from_status(status: dict, requests_total: float, t: float) -> dict:
    """One sample from a /status dict (the one-worker shape or the fleet shape: both sum the same)."""
    q = status.get("queue") or {}
    depth = q.get("total")
    if depth is None:
        depth = sum((q.get("depth") or {}).values())
    gpus = [{"index": d.get("index"), "used": d.get("memory_used_bytes", 0), "total": d.get("memory_total_bytes", 0)}
            for d in (status.get("gpu") or {}).get("devices") or []]
    return {"t": round(t, 3), "requests_total": requests_total, "queue_depth": depth,
            "inflight": q.get("inflight", 0), "gpu": gpus}


async def run_sampler(ring: SampleRing, read_status: Callable[[], dict], read_total: Callable[[], float]) -> None:
    """Take a sample every `ring.interval_s` until cancelled (the daemon owns this task)."""
    while True:
        try:
            ring.push(sample_from_status(read_status(), read_total(), ring.now()))
        except Exception:  # top level of a background task: a bad reading must not end the sampling
            log.exception("ui_sample_failed")
        await asyncio.sleep(ring.interval_s)


def respond(request: web.BaseRequest, authorized: bool, token: bytes | None, ring: SampleRing) -> web.StreamResponse:
    """Answer /ui or /ui/samples; `authorized` is the daemon's Bearer check of this request."""
    path = request.path
    if path == "/ui" and not authorized and token is not None:
        got = request.query.get("token", "")
        authorized = bool(got) and hmac.compare_digest(got.encode(), token)
    if not authorized:
        return error_response("unauthorized", f"{path} needs Authorization: Bearer <admin.token_file token>"
                              + (" or, to open the page in a browser, /ui?token=<token>" if path == "/ui" else ""),
                              None, headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"})
    if path == "/ui/samples":
        return web.Response(body=json.dumps(ring.to_json()).encode(), content_type="application/json",
                            headers={"Cache-Control": "no-store"})
    return web.Response(body=PAGE_BYTES, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


_STYLE = """
:root { --bg:#0f1419; --fg:#d8dee6; --dim:#7d8893; --card:#171d24; --line:#2a323c; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       background:var(--bg); color:var(--fg); }
header { display:flex; gap:16px; align-items:baseline; padding:12px 20px; border-bottom:1px solid var(--line); }
header h1 { font-size:18px; margin:0; }
#badge { padding:2px 10px; border-radius:10px; font-weight:600; }
#badge.ready { background:#1f6f3a; } #badge.notready { background:#8a1f1f; } #badge.unknown { background:#444; }
#meta, #updated { color:var(--dim); }
#error { color:#ff8a80; padding:0 20px; min-height:1.4em; }
main { padding:8px 20px 20px; display:grid; gap:16px; }
section { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:10px 14px; }
h2 { font-size:14px; margin:0 0 8px; color:var(--dim); text-transform:uppercase; letter-spacing:.05em; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:3px 8px; border-bottom:1px solid var(--line); white-space:nowrap; }
th { color:var(--dim); font-weight:500; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
.state { padding:1px 8px; border-radius:8px; font-weight:600; color:#fff; background:#555; }
.st-ready,.st-closed,.st-ok { background:#1f7a3f; } .st-busy { background:#1d6fa5; }
.st-starting,.st-draining,.st-stopping,.st-half_open,.st-soft { background:#9a7b12; }
.st-backoff,.st-hard { background:#a3541a; } .st-failed,.st-open,.st-forced_open,.st-critical { background:#b3261e; }
.st-stopped,.st-unloaded { background:#4a5260; }
.st-asleep { background:#3b4f8a; }
#charts { display:grid; grid-template-columns:repeat(auto-fit, minmax(290px, 1fr)); gap:16px; }
.chart svg { width:100%; height:150px; display:block; }
.chart .axis { stroke:var(--line); stroke-width:1; }
.chart text { fill:var(--dim); font-size:10px; }
.chart polyline { fill:none; stroke-width:1.6; }
.legend span { margin-right:12px; color:var(--dim); }
#summary span { margin-right:18px; }
"""

_SCRIPT = r"""
"use strict";
const POLL_MS = 2000;
const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292"];
const params = new URLSearchParams(location.search);
if (params.has("token")) {
  sessionStorage.setItem("gpu-supervisor-token", params.get("token"));
  params.delete("token");
  const q = params.toString();
  history.replaceState(null, "", location.pathname + (q ? "?" + q : "") + location.hash);
}
const TOKEN = sessionStorage.getItem("gpu-supervisor-token");
const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function svgEl(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function bytes(n) {
  if (typeof n !== "number" || n <= 0) return "-";
  const u = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [name, size] of u) if (n >= size) return (n / size).toFixed(1) + " " + name;
  return n + " B";
}
function dur(s) {
  if (typeof s !== "number") return "-";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? d + "d" + h + "h" : h ? h + "h" + m + "m" : m ? m + "m" + (s % 60) + "s" : s + "s";
}
function cell(v) { return v === null || v === undefined || v === "" ? "-" : v; }
function stateTag(s) { return el("span", {"class": "state st-" + cell(s), "data-state": cell(s)}, cell(s)); }
function exitText(e) {
  if (!e || typeof e !== "object") return "-";
  let t = cell(e.reason);
  if (e.signal) t += ", signal " + e.signal; else if (e.code !== null && e.code !== undefined) t += ", code " + e.code;
  if (e.at) t += ", at " + e.at;
  return t;
}

async function getJSON(url) {
  const headers = TOKEN ? {"Authorization": "Bearer " + TOKEN} : {};
  const r = await fetch(url, {headers, cache: "no-store"});
  if (r.status === 401) throw new Error(url + ": 401 unauthorized: open /ui?token=<admin token>");
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

function rows(st) {
  const out = [];
  if (st.workers && typeof st.workers === "object" && Object.keys(st.workers).length) {
    for (const [name, w] of Object.entries(st.workers)) {
      const reps = Array.isArray(w.replicas) ? w.replicas : [];
      reps.forEach((r, i) => out.push(Object.assign({worker: name, replica: r.index ?? i}, r)));
    }
    return out;
  }
  const w = st.worker || {};
  return [Object.assign({worker: "default", replica: 0, breaker: st.breaker}, w)];
}

function renderWorkers(st) {
  const body = $("workers-body");
  body.replaceChildren();
  for (const r of rows(st)) {
    const tr = el("tr", {"data-worker": r.worker, "data-replica": r.replica, "data-state": cell(r.state)});
    const num = (v) => el("td", {"class": "num"}, v);
    tr.append(el("td", {}, r.worker), num(cell(r.replica)), num(cell(r.gpu)));
    const s = el("td"); s.append(stateTag(r.state)); tr.append(s);
    tr.append(num(cell(r.pid)), num(bytes(r.rss_bytes)), num(bytes(r.gpu_memory_bytes)), num(cell(r.inflight)),
              num(cell(r.served ?? r.requests_served)), num(cell(r.restarts)));
    const b = el("td"); b.append(stateTag(r.breaker && r.breaker.state)); tr.append(b);
    tr.append(el("td", {}, exitText(r.last_exit)));
    body.append(tr);
  }
}

function renderExits(st) {
  let exits = [];
  if (Array.isArray(st.exits)) exits = st.exits.slice(-20);
  else for (const r of rows(st)) {
    if (r.last_exit) exits.push(Object.assign({worker: r.worker, replica: r.replica}, r.last_exit));
  }
  const body = $("exits-body");
  body.replaceChildren();
  for (const e of exits.slice().reverse()) {
    const tr = el("tr", {"data-reason": cell(e.reason)});
    const num = (v) => el("td", {"class": "num"}, cell(v));
    tr.append(el("td", {}, cell(e.at)), el("td", {}, cell(e.worker)), num(e.replica),
              el("td", {}, cell(e.reason)), num(e.code), num(e.signal));
    body.append(tr);
  }
  $("exits-none").hidden = exits.length > 0;
}

function renderSummary(st) {
  const ready = st.ready === true;
  const badge = $("badge");
  badge.textContent = ready ? "READY" : "NOT READY";
  badge.className = ready ? "ready" : "notready";
  $("meta").textContent = "v" + cell(st.version) + ", up " + dur(st.uptime_s) +
    (st.config ? ", config " + cell(st.config.source) + " (generation " + cell(st.config.generation) + ")" : "") +
    (Array.isArray(st.not_ready_because) && st.not_ready_because.length
      ? ", not ready: " + st.not_ready_because.join("; ") : "");
  const sum = $("summary");
  sum.replaceChildren();
  const q = st.queue || {};
  const depth = q.depth || {};
  sum.append(el("span", {}, "queue: " + Object.entries(depth).map(([k, v]) => k + " " + v).join(", ") +
                 " (total " + cell(q.total) + ", in flight " + cell(q.inflight) + " / " + cell(q.concurrency) + ")"));
  const br = el("span", {}, "breaker: "); br.append(stateTag(st.breaker && st.breaker.state)); sum.append(br);
  const g = st.gpu || {};
  const gp = el("span", {}, "gpu: " + (g.available ? "available" : "not available") + ", pressure ");
  gp.append(stateTag(g.pressure)); sum.append(gp);
  if (st.jobs && typeof st.jobs === "object")
    sum.append(el("span", {}, "jobs: " + Object.entries(st.jobs).filter(([, v]) => typeof v !== "object")
                                           .map(([k, v]) => k + " " + v).join(", ")));
}

// one SVG line chart: series = [{name, points: [[t, v], ...]}]
function drawChart(id, series, fmt, now, span) {
  const svg = $(id);
  const W = 400, H = 150, L = 46, R = 6, T = 8, B = 18;
  svg.replaceChildren();
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  let max = 0, count = 0;
  for (const s of series) for (const [, v] of s.points) if (typeof v === "number") { max = Math.max(max, v); count++; }
  if (max <= 0) max = 1;
  const x = (t) => L + (W - L - R) * (1 - (now - t) / span);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  svg.append(svgEl("line", {"class": "axis", x1: L, y1: H - B, x2: W - R, y2: H - B}),
             svgEl("line", {"class": "axis", x1: L, y1: T, x2: L, y2: H - B}));
  const top = svgEl("text", {x: 2, y: T + 8}); top.textContent = fmt(max); svg.append(top);
  const zero = svgEl("text", {x: 2, y: H - B}); zero.textContent = "0"; svg.append(zero);
  const left = svgEl("text", {x: L, y: H - 4}); left.textContent = "-" + dur(span); svg.append(left);
  const right = svgEl("text", {x: W - R - 24, y: H - 4}); right.textContent = "now"; svg.append(right);
  const legend = $(id + "-legend");
  if (legend) legend.replaceChildren();
  series.forEach((s, i) => {
    const pts = s.points.filter(([, v]) => typeof v === "number")
                        .map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1));
    const color = COLORS[i % COLORS.length];
    if (pts.length) svg.append(svgEl("polyline", {points: pts.join(" "), stroke: color, "data-series": s.name}));
    if (legend) { const l = el("span", {}, "\u25A0 " + s.name); l.style.color = color; legend.append(l); }
  });
  svg.dataset.points = String(count);
  svg.dataset.drawn = count > 0 ? "1" : "0";
}

function renderCharts(sm) {
  const samples = Array.isArray(sm.samples) ? sm.samples : [];
  const now = typeof sm.now === "number" ? sm.now : (samples.length ? samples[samples.length - 1].t : 0);
  // from the oldest sample kept (at least a minute) to now: the ring's whole span once it is full
  const span = Math.max(60, samples.length ? now - samples[0].t : 0);
  const num = (v) => (Math.round(v * 10) / 10).toString();
  drawChart("chart-rate", [{name: "requests/s", points: samples.map((s) => [s.t, s.rate])}], num, now, span);
  drawChart("chart-queue", [{name: "queued", points: samples.map((s) => [s.t, s.queue_depth])}], num, now, span);
  drawChart("chart-inflight", [{name: "in flight", points: samples.map((s) => [s.t, s.inflight])}], num, now, span);
  const gpus = new Map();
  for (const s of samples) for (const g of s.gpu || []) {
    if (!gpus.has(g.index)) gpus.set(g.index, []);
    gpus.get(g.index).push([s.t, g.used]);
  }
  const series = [...gpus.entries()].map(([idx, pts]) => ({name: "gpu " + idx, points: pts}));
  drawChart("chart-gpu", series, bytes, now, span);
  $("gpu-none").hidden = series.length > 0;
}

async function tick() {
  try {
    const [st, sm] = await Promise.all([getJSON("status"), getJSON("ui/samples")]);
    renderSummary(st); renderWorkers(st); renderExits(st); renderCharts(sm);
    $("error").textContent = "";
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (e) {
    $("error").textContent = String(e && e.message || e);
    $("badge").className = "unknown"; $("badge").textContent = "UNREACHABLE";
  } finally {
    setTimeout(tick, POLL_MS);
  }
}
tick();
"""

_BODY = """
<header><h1>gpu-supervisor</h1><span id="badge" class="unknown">...</span><span id="meta"></span>
<span id="updated"></span></header>
<div id="error"></div>
<main>
<section><h2>Overview</h2><div id="summary"></div></section>
<section><h2>Workers</h2><table><thead><tr><th>worker</th><th>replica</th><th>gpu</th><th>state</th><th>pid</th>
<th>rss</th><th>gpu mem</th><th>in flight</th><th>served</th><th>restarts</th><th>breaker</th><th>last exit</th></tr>
</thead><tbody id="workers-body"></tbody></table></section>
<div id="charts">
<section class="chart"><h2>Request rate (req/s)</h2><svg id="chart-rate" role="img" aria-label="request rate"></svg>
</section>
<section class="chart"><h2>Queue depth</h2><svg id="chart-queue" role="img" aria-label="queue depth"></svg></section>
<section class="chart"><h2>In flight</h2><svg id="chart-inflight" role="img" aria-label="in flight"></svg></section>
<section class="chart"><h2>GPU memory used</h2><svg id="chart-gpu" role="img" aria-label="gpu memory"></svg>
<div class="legend" id="chart-gpu-legend"></div><div id="gpu-none" hidden>no GPU readings (NVML not available)</div>
</section>
</div>
<section><h2>Recent worker exits</h2><table><thead><tr><th>at</th><th>worker</th><th>replica</th><th>reason</th>
<th>code</th><th>signal</th></tr></thead><tbody id="exits-body"></tbody></table>
<div id="exits-none">no worker exit yet</div></section>
</main>
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>gpu-supervisor</title><style>{_STYLE}</style></head>\n<body>{_BODY}"
        f"<script>{_SCRIPT}</script></body></html>\n")
PAGE_BYTES = PAGE.encode()
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # the page's own inline style and script (by hash), and fetches to its own origin: nothing else
    "Content-Security-Policy": (f"default-src 'none'; style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_SCRIPT)}; "
                                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
}

__all__ = ["SampleRing", "PATHS", "request_rate", "sample_from_status", "run_sampler", "respond",
           "PAGE"]
