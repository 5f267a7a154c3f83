"""The job metrics (jobs_total{status}, jobs_pending, jobs_store_errors_total) and the hooks that feed them."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from .manager import JobHooks
from .model import JobStatus

P = "gpu_supervisor_"


def job_metrics(registry: CollectorRegistry, pending: Callable[[], float]) -> JobHooks:
    """Declare the job metrics in `registry`; `pending` is read at scrape time (no I/O: a cached count)."""
    total = Counter(P + "jobs", "Async jobs that entered a status, by status.", ["status"], registry=registry)
    for s in JobStatus:
        total.labels(s.value)
    errors = Counter(P + "jobs_store_errors", "Job store operations that failed (store down, full, unreadable).",
                     registry=registry)
    gauge = Gauge(P + "jobs_pending", "Async jobs queued or running in the job store.", registry=registry)
    gauge.set_function(pending)
    children = {s.value: total.labels(s.value) for s in JobStatus}
    return JobHooks(on_status=lambda status: children[status].inc(), on_store_error=errors.inc)
