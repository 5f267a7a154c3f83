"""Prometheus metrics: declared together with fixed label names, one registry per supervisor.

The series every request moves (requests, request duration, queue wait, routing decisions) are plain counts kept by
`RequestMetrics` and rendered at scrape time, as prometheus_client renders a Counter and a Histogram
(`_total`/`_bucket`/`_count`/`_sum` and `_created`): no lock, no label lookup per request. The others are
prometheus_client Counters and Histograms; everything that is a reading of current state is produced at
scrape time by `StateCollector`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .states import BreakerState, WorkerState
from .upstream import PROTOCOL_ERROR_KINDS

P = "gpu_supervisor_"
LONG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
REJECT_REASONS = ("queue_full", "overloaded", "circuit_open", "queue_timeout", "worker_unavailable",
                  "shutting_down", "bad_request", "payload_too_large", "unauthorized", "model_not_found",
                  "jobs_unavailable", "rate_limited")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # the daemon's own process, as every Prometheus client library exports it: open and max file
        # descriptors (a listener out of descriptors drops new connections), RSS, CPU seconds, start time
        ProcessCollector(registry=r)
        self.per_request = RequestMetrics()
        r.register(self.per_request)
        self.rejected = Counter(P + "rejected", "Requests refused by the supervisor itself, by reason.",
                                ["reason"], registry=r)
        self.retries = Counter(P + "retries", "Requests sent to the worker again, by reason.", ["reason"], registry=r)
        self.worker_restarts = Counter(P + "worker_restarts", "Replica restarts, by worker, replica and exit reason.",
                                       ["worker", "replica", "reason"], registry=r)
        self.worker_unloads = Counter(P + "worker_unloads", "Replicas stopped and left unloaded, by worker and reason "
                                      "(idle, evicted).", ["worker", "reason"], registry=r)
        self.worker_sleeps = Counter(P + "worker_sleeps", "Replicas put to sleep (sleep mode), by worker and reason "
                                     "(evicted: to make room, idle: sleep.after_idle_s).", ["worker", "reason"],
                                     registry=r)
        self.worker_wake = Histogram(P + "worker_wake_seconds", "Time from a sleeping replica's wake (room on its "
                                     "GPU included) to serving again.", buckets=LONG_BUCKETS, registry=r)
        self.worker_protocol_errors = Counter(P + "worker_protocol_errors", "Worker answers refused as invalid HTTP "
                                              "(bad status, oversized head, bytes past the end of an answer).",
                                              ["kind"], registry=r)
        self.worker_start = Histogram(P + "worker_start_seconds", "Time from spawning the worker to its first "
                                      "healthy answer.", buckets=LONG_BUCKETS, registry=r)
        self.breaker_transitions = Counter(P + "breaker_transitions", "Circuit breaker state changes, by new state.",
                                           ["state"], registry=r)
        self.config_reloads = Counter(P + "config_reloads", "Configuration reloads, by result.", ["result"],
                                      registry=r)
        self.pressure_actions = Counter(P + "pressure_actions", "Memory-pressure actions taken, by action.",
                                        ["action"], registry=r)
        self.loop_lag = Histogram(P + "event_loop_lag_seconds", "How late the event loop woke a timer: "
                                  "a stalled loop delays every request.",
                                  buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
                                  registry=r)
        self.trace_export_errors = Counter(P + "trace_export_errors", "Span exports that failed (the collector "
                                           "down or refusing them); their spans are dropped.", registry=r)
        self.budget_store_errors = Counter(P + "budget_store_errors", "Budget store calls that failed (budgets "
                                           "then fail open: the request is admitted).", registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for kind in PROTOCOL_ERROR_KINDS:
            self.worker_protocol_errors.labels(kind)
        self.observe_request = self.per_request.observe_request
        self.observe_wait = self.per_request.observe_wait
        self.observe_decision = self.per_request.observe_decision
        self.clients = ClientMetrics()
        r.register(self.clients)
        self.client_count = self.clients.count

    def requests_total(self) -> int:
        """Requests answered so far, all labels together."""
        return sum(c.n for c in self.per_request.requests.values())

    def attach_state(self, read: Callable[[], dict]) -> None:
        self.registry.register(StateCollector(read))


class _Count:
    __slots__ = ("n", "created")

    def __init__(self) -> None:
        self.n = 0
        self.created = time.time()


class _Hist:
    """One histogram child: a count per bucket (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("counts", "sum", "created")

    def __init__(self, n_buckets: int) -> None:
        self.counts = [0] * (n_buckets + 1)
        self.sum = 0.0
        self.created = time.time()


class RequestMetrics(Collector):
    """gpu_supervisor_requests_total, _request_duration_seconds and _queue_wait_seconds, counted in plain
    dicts on the event loop (scrapes run there too) and exposed exactly as prometheus_client's Counter and
    Histogram with LONG_BUCKETS would expose them."""

    def __init__(self, buckets: tuple[float, ...] = LONG_BUCKETS):
        self.buckets = buckets
        self._les = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self.requests: dict[tuple[str, int, str], _Count] = {}
        self.duration: dict[str, _Hist] = {}
        self.queue_wait: dict[str, _Hist] = {}
        self.decisions: dict[tuple[str, str], _Count] = {}

    def observe_request(self, priority: str, code: int, duration_s: float, worker: str = "none") -> None:
        c = self.requests.get((priority, code, worker))
        if c is None:
            c = self.requests[(priority, code, worker)] = _Count()
        c.n += 1
        h = self.duration.get(priority)
        if h is None:
            h = self.duration[priority] = _Hist(len(self.buckets))
        h.counts[bisect_left(self.buckets, duration_s)] += 1
        h.sum += duration_s

    def observe_wait(self, priority: str, wait_s: float) -> None:
        h = self.queue_wait.get(priority)
        if h is None:
            h = self.queue_wait[priority] = _Hist(len(self.buckets))
        h.counts[bisect_left(self.buckets, wait_s)] += 1
        h.sum += wait_s

    def observe_decision(self, worker: str, decision: str) -> None:
        """A replica was chosen for a call, and why (routing: least_loaded, session, prefix_hit, ...)."""
        c = self.decisions.get((worker, decision))
        if c is None:
            c = self.decisions[(worker, decision)] = _Count()
        c.n += 1

    def collect(self) -> Iterator[Metric]:
        req = Metric(P + "requests", "Requests answered, by priority, HTTP status and worker.", "counter")
        for (prio, code, worker), c in list(self.requests.items()):
            labels = {"priority": prio, "code": str(code), "worker": worker}
            req.add_sample(P + "requests_total", labels, c.n)
            req.add_sample(P + "requests_created", labels, c.created)
        yield req
        dec = Metric(P + "routing_decisions", "Replicas chosen for requests, by worker and why "
                     "(least_loaded, session, prefix_hit, prefix_miss, balance).", "counter")
        for (worker, decision), c in list(self.decisions.items()):
            labels = {"worker": worker, "decision": decision}
            dec.add_sample(P + "routing_decisions_total", labels, c.n)
            dec.add_sample(P + "routing_decisions_created", labels, c.created)
        yield dec
        yield self._histogram(P + "request_duration_seconds", "Time from arrival to the end of the answer.",
                              self.duration)
        yield self._histogram(P + "queue_wait_seconds", "Time spent queued before a worker slot.", self.queue_wait)

    def _histogram(self, name: str, doc: str, children: dict[str, _Hist]) -> Metric:
        m = Metric(name, doc, "histogram")
        for prio, h in list(children.items()):
            acc = 0
            for le, n in zip(self._les, h.counts):
                acc += n
                m.add_sample(name + "_bucket", {"priority": prio, "le": le}, acc)
            m.add_sample(name + "_count", {"priority": prio}, acc)
            m.add_sample(name + "_sum", {"priority": prio}, h.sum)
            m.add_sample(name + "_created", {"priority": prio}, h.created)
        return m

    def describe(self) -> Iterator[Metric]:
        # the names this collector owns, so the registry refuses a second metric of the same name
        yield Metric(P + "requests", "", "counter")
        yield Metric(P + "routing_decisions", "", "counter")
        yield Metric(P + "request_duration_seconds", "", "histogram")
        yield Metric(P + "queue_wait_seconds", "", "histogram")


class ClientMetrics(Collector):
    """gpu_supervisor_client_tokens_total{client,kind} and _client_rate_limited_total{client} (client budgets),
    counted in plain counts on the event loop and exposed as prometheus_client's Counter would."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], _Count] = {}  # (client, kind) -> count; kind "" is rate_limited

    def count(self, client: str, kind: str | None) -> _Count:
        """The count of client_tokens_total{client, kind} (kind input or output), or of
        client_rate_limited_total{client} (kind None); the caller keeps it and adds to `n`."""
        k = (client, kind or "")
        c = self.counts.get(k)
        if c is None:
            c = self.counts[k] = _Count()
        return c

    def collect(self) -> Iterator[Metric]:
        tokens = Metric(P + "client_tokens", "Tokens of answered requests by client (a name listed under "
                        "clients.keys, else other) and kind (input, output).", "counter")
        limited = Metric(P + "client_rate_limited", "Requests refused 429 rate_limited, by client (a name listed "
                         "under clients.keys, else other).", "counter")
        for (client, kind), c in list(self.counts.items()):
            m, name, labels = (tokens, "client_tokens", {"client": client, "kind": kind}) if kind \
                else (limited, "client_rate_limited", {"client": client})
            m.add_sample(P + name + "_total", labels, c.n)
            m.add_sample(P + name + "_created", labels, c.created)
        yield tokens
        yield limited

    def describe(self) -> Iterator[Metric]:
        yield Metric(P + "client_tokens", "", "counter")
        yield Metric(P + "client_rate_limited", "", "counter")


class StateCollector(Collector):
    """Gauges read from the supervisor's state at scrape time."""

    def __init__(self, read: Callable[[], dict]):
        self._read = read

    def collect(self):
        s = self._read()
        g = GaugeMetricFamily(P + "queue_depth", "Requests waiting, by priority and worker.",
                              labels=["priority", "worker"])
        for worker, depth in s["queue_depth"].items():
            for prio, n in depth.items():
                g.add_metric([prio, worker], n)
        yield g
        reps = s["replicas"]
        wr = ["worker", "replica"]
        inflight = GaugeMetricFamily(P + "inflight", "Requests being served, by worker and replica.", labels=wr)
        up = GaugeMetricFamily(P + "worker_up", "1 when the replica is ready to serve.", labels=wr)
        rss = GaugeMetricFamily(P + "worker_rss_bytes", "Resident memory of the replica's process tree.", labels=wr)
        gpu = GaugeMetricFamily(P + "worker_gpu_memory_bytes", "GPU memory used by the replica's process tree.",
                                labels=wr)
        wstate = StateSetMetricFamily(P + "worker_state", "The replica's lifecycle state.", labels=wr)
        bstate = StateSetMetricFamily(P + "breaker_state", "The replica's circuit breaker state.", labels=wr)
        for r in reps:
            lv = [r["worker"], r["replica"]]
            inflight.add_metric(lv, r["inflight"])
            up.add_metric(lv, r["up"])
            rss.add_metric(lv, r["rss_bytes"])
            gpu.add_metric(lv, r["gpu_memory_bytes"])
            wstate.add_metric(lv, {st.value: st.value == r["state"] for st in WorkerState})
            bstate.add_metric(lv, {b.value: b.value == r["breaker"] for b in BreakerState})
        yield from (inflight, up, wstate, rss, gpu, bstate)
        used = GaugeMetricFamily(P + "gpu_memory_used_bytes", "GPU memory in use, by device.", labels=["gpu"])
        total = GaugeMetricFamily(P + "gpu_memory_total_bytes", "GPU memory in all, by device.", labels=["gpu"])
        util = GaugeMetricFamily(P + "gpu_utilization_ratio", "GPU utilisation (0..1), by device.", labels=["gpu"])
        for d in s["gpus"]:
            idx = str(d["index"])
            used.add_metric([idx], d["memory_used_bytes"])
            total.add_metric([idx], d["memory_total_bytes"])
            if d.get("utilization") is not None:
                util.add_metric([idx], d["utilization"])
        yield used
        yield total
        yield util
        reserved = GaugeMetricFamily(P + "gpu_memory_reserved_bytes", "GPU memory the ledger counts as held by "
                                     "started replicas and other processes, by device.", labels=["gpu"])
        for idx, held in s.get("ledger", {}).items():
            reserved.add_metric([str(idx)], held)
        yield reserved
        yield GaugeMetricFamily(P + "pressure_level", "Memory pressure: 0 ok, 1 soft, 2 hard, 3 critical.",
                                value=s["pressure_level"])
        yield GaugeMetricFamily(P + "degraded", "1 while a replica runs in a degraded mode (CPU fallback).",
                                value=s["degraded"])
        yield GaugeMetricFamily(P + "config_generation", "How many times the configuration was loaded.",
                                value=s["config_generation"])


def _stateset(name: str, doc: str, states: list[str], current: str) -> StateSetMetricFamily:
    m = StateSetMetricFamily(name, doc)
    m.add_metric([], {st: st == current for st in states})
    return m
