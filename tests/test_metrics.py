"""The per-request series and routing decisions are counted by hand (RequestMetrics) and must read exactly
as prometheus_client's own Counter and Histogram would, for every label value and bucket edge."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from supervisor.metrics import LONG_BUCKETS, Metrics, P, RequestMetrics

# values on, below and above bucket edges, and past the last one
OBSERVED = [0.0, 0.001, 0.0010001, 0.003, 0.5, 1.0, 1.5, 600.0, 601.0, 1e9]


def _lines(registry: CollectorRegistry) -> list[str]:
    # _created holds the wall time each child was made: the same series, a different value
    return [ln for ln in generate_latest(registry).decode().splitlines() if "_created" not in ln]


def test_request_series_read_as_prometheus_clients_counter_and_histograms():
    ours = CollectorRegistry()
    m = RequestMetrics()
    ours.register(m)
    ref = CollectorRegistry()
    requests = Counter(P + "requests", "Requests answered, by priority, HTTP status and worker.",
                       ["priority", "code", "worker"], registry=ref)
    duration = Histogram(P + "request_duration_seconds", "Time from arrival to the end of the answer.",
                         ["priority"], buckets=LONG_BUCKETS, registry=ref)
    wait = Histogram(P + "queue_wait_seconds", "Time spent queued before a worker slot.", ["priority"],
                     buckets=LONG_BUCKETS, registry=ref)
    decisions = Counter(P + "routing_decisions", "Replicas chosen for requests, by worker and why "
                        "(least_loaded, session, prefix_hit, prefix_miss, balance).", ["worker", "decision"],
                        registry=ref)
    for i, v in enumerate(OBSERVED):
        prio, code, worker = ("high", 200, "chat") if i % 3 else ("low", 503, "none")
        m.observe_request(prio, code, v, worker)
        requests.labels(prio, str(code), worker).inc()
        duration.labels(prio).observe(v)
        m.observe_wait(prio, v / 2)
        wait.labels(prio).observe(v / 2)
        decision = ("prefix_hit", "session", "balance")[i % 3]
        m.observe_decision(worker, decision)
        decisions.labels(worker, decision).inc()
    assert sorted(_lines(ours)) == sorted(_lines(ref))
    text = generate_latest(ours).decode()
    assert f'{P}requests_total{{code="200",priority="high",worker="chat"}} 6.0' in text
    assert f'{P}request_duration_seconds_bucket{{le="1.0",priority="high"}}' in text
    assert f'{P}requests_created{{code="503",priority="low",worker="none"}}' in text


def test_metrics_refuses_a_second_metric_under_a_per_request_name():
    m = Metrics()
    assert m.requests_total() == 0
    m.observe_request("normal", 200, 0.01, "w")
    m.observe_request("normal", 429, 0.01, "none")
    assert m.requests_total() == 2
    with pytest.raises(ValueError):
        Counter(P + "requests", "again", registry=m.registry)


def test_the_daemons_own_process_is_exported_open_and_max_descriptors_included():
    import os
    import resource

    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics()
    read = {s.name: s.value for f in text_string_to_metric_families(generate_latest(m.registry).decode())
            for s in f.samples}
    assert read["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    before = read["process_open_fds"]
    extra = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
    try:
        read = {s.name: s.value for f in text_string_to_metric_families(generate_latest(m.registry).decode())
                for s in f.samples}
        assert read["process_open_fds"] == before + 5
    finally:
        for fd in extra:
            os.close(fd)
    assert read["process_resident_memory_bytes"] > 0 and read["process_cpu_seconds_total"] > 0
