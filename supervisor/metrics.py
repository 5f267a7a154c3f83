"""Prometheus metrics: declared together with fixed label names, one registry per supervisor.

Counters and histograms are updated on the request path (children resolved once and cached);
everything that is a reading of current state is produced at scrape time by `StateCollector`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, StateSetMetricFamily
from prometheus_client.registry import Collector

from .states import BreakerState, WorkerState
from .upstream import PROTOCOL_ERROR_KINDS

P = "gpu_supervisor_"
LONG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
REJECT_REASONS = ("queue_full", "overloaded", "circuit_open", "queue_timeout", "worker_unavailable",
                  "shutting_down", "bad_request", "payload_too_large", "unauthorized", "model_not_found",
                  "jobs_unavailable")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(P + "requests", "Requests answered, by priority, HTTP status and worker.",
                                ["priority", "code", "worker"], registry=r)
        self.duration = Histogram(P + "request_duration_seconds", "Time from arrival to the end of the answer.",
                                  ["priority"], buckets=LONG_BUCKETS, registry=r)
        self.queue_wait = Histogram(P + "queue_wait_seconds", "Time spent queued before a worker slot.",
                                    ["priority"], buckets=LONG_BUCKETS, registry=r)
        self.rejected = Counter(P + "rejected", "Requests refused by the supervisor itself, by reason.",
                                ["reason"], registry=r)
        self.retries = Counter(P + "retries", "Requests sent to the worker again, by reason.", ["reason"], registry=r)
        self.worker_restarts = Counter(P + "worker_restarts", "Replica restarts, by worker, replica and exit reason.",
                                       ["worker", "replica", "reason"], registry=r)
        self.worker_unloads = Counter(P + "worker_unloads", "Replicas stopped and left unloaded, by worker and reason "
                                      "(idle, evicted).", ["worker", "reason"], registry=r)
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
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for kind in PROTOCOL_ERROR_KINDS:
            self.worker_protocol_errors.labels(kind)
        self._req: dict[tuple[str, int, str], Any] = {}
        self._dur: dict[str, Any] = {}
        self._wait: dict[str, Any] = {}

    def observe_request(self, priority: str, code: int, duration_s: float, worker: str = "none") -> None:
        c = self._req.get((priority, code, worker))
        if c is None:
            c = self._req[(priority, code, worker)] = self.requests.labels(priority, str(code), worker)
        c.inc()
        h = self._dur.get(priority)
        if h is None:
            h = self._dur[priority] = self.duration.labels(priority)
        h.observe(duration_s)

    def observe_wait(self, priority: str, wait_s: float) -> None:
        h = self._wait.get(priority)
        if h is None:
            h = self._wait[priority] = self.queue_wait.labels(priority)
        h.observe(wait_s)

    def attach_state(self, read: Callable[[], dict]) -> None:
        self.registry.register(StateCollector(read))


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
