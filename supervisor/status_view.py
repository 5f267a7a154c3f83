"""What /status and the scrape-time metrics say: the supervisor's state rendered, nothing decided here."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import __version__
from .states import SERVING_STATES

if TYPE_CHECKING:
    from .app import Supervisor
    from .fleet import Replica, WorkerGroup


def _breaker(r: Replica, now: float) -> dict:
    b = r.breaker
    return {"state": b.state.value, "failure_rate": round(b.failure_rate, 4),
            "slow_call_rate": round(b.slow_rate, 4), "retry_after_s": round(b.retry_after(now), 3)}


def _replica(sup: Supervisor, g: WorkerGroup, r: Replica, now: float) -> dict:
    m = r.status()
    return {
        "index": r.index, "gpu": r.gpu, "state": m["state"], "pid": m["pid"], "restarts": m["restarts"],
        "last_exit": m["last_exit"], "started_at": m["started_at"], "inflight": m["inflight"],
        "served": m["requests_served"], "breaker": _breaker(r, now), "rss_bytes": r.rss_bytes,
        "gpu_memory_bytes": r.gpu_memory_bytes, "gpu_memory_need_bytes": sup.room.need_bytes(r),
        "gpu_memory_declared_bytes": r.spec.gpu_memory_mb << 20, "gpu_memory_learned_bytes": r.gpu_peak_bytes,
        "degraded": m["degraded"], "backoff_s": m["backoff_s"],
        "waiting_for_room": r.room.waiting_since is not None,
        "refused": r.room.refused,
        "asleep_gpu_memory_bytes": sup.room.resident(r, now).asleep_bytes if r.spec.sleep is not None else None,
        "last_wake_s": round(r.last_wake_s, 3) if r.last_wake_s is not None else None,
        **g.router.status(r, now),
    }


def _queue(g: WorkerGroup) -> dict:
    q = g.queue
    out = {
        "depth": q.depth_by_name(), "total": q.total, "inflight": q.inflight(),
        "concurrency": q.pools["default"].slots,
        "pools": {n: {"concurrency": p.slots, "inflight": p.in_use, "waiting": p.waiting} for n, p in q.pools.items()},
        "dispatching": q.open,
    }
    if hasattr(q, "fairness_status"):
        out["fairness"] = q.fairness_status()
    return out


def render_status(sup: Supervisor) -> dict:
    ready, why = sup.readiness()
    now = time.monotonic()
    fleet = sup.fleet
    first = fleet.first()
    workers = {}
    depth: dict[str, int] = {}
    pools: dict[str, dict] = {}
    for g in fleet.groups.values():
        q = _queue(g)
        for lvl, n in q["depth"].items():
            depth[lvl] = depth.get(lvl, 0) + n
        for name, p in q["pools"].items():
            agg = pools.setdefault(name, {"concurrency": 0, "inflight": 0, "waiting": 0})
            for k in agg:
                agg[k] += p[k]
        workers[g.name] = {
            "models": list(g.models), "models_declared": bool(g.spec.models),
            "models_missing": None if g.models_missing is None else list(g.models_missing), "start": g.spec.start,
            "pinned": g.spec.pinned, "idle_unload_s": g.spec.idle_unload_s,
            "replicas": [_replica(sup, g, r, now) for r in g.replicas], "queue": q,
            "routing": g.spec.routing.affinity, "load_signals": g.spec.load_signals.enabled,
        }
    fm = first.status()
    gpu = dict(sup.pressure.gpu_status)
    gpu["ledger"] = sup.room.status()
    out = {
        "version": __version__,
        "uptime_s": round(now - sup.started, 3),
        "ready": ready,
        "not_ready_because": why,
        "accepting": sup.accepting,
        "config": {"source": sup.loaded.source, "digest": sup.loaded.digest, "generation": sup.config_generation,
                   "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sup.config_loaded_at))},
        "worker": fm | {"name": first.worker, "replica": first.index, "rss_bytes": first.rss_bytes,
                        "gpu_memory_bytes": first.gpu_memory_bytes},
        "workers": workers,
        "queue": {"depth": depth, "total": sup.queued(), "inflight": sup.inflight(),
                  "concurrency": sum(g.queue.pools["default"].slots for g in fleet.groups.values()),
                  "pools": pools, "dispatching": any(g.queue.open for g in fleet.groups.values())},
        "breaker": _breaker(first, now),
        "gpu": gpu,
        "exits": list(fleet.exits),
    }
    if sup.jobs is not None:
        out["jobs"] = sup.jobs.status()
    return out


def metrics_state(sup: Supervisor) -> dict:
    reps = []
    for r in sup.fleet.replicas():
        reps.append({"worker": r.worker, "replica": r.label, "inflight": r.inflight,
                     "up": 1 if r.state in SERVING_STATES else 0, "state": r.state.value,
                     "rss_bytes": r.rss_bytes, "gpu_memory_bytes": r.gpu_memory_bytes,
                     "breaker": r.breaker.state.value})
    return {
        "queue_depth": {g.name: g.queue.depth_by_name() for g in sup.fleet.groups.values()},
        "replicas": reps,
        "gpus": sup.pressure.gpu_status.get("devices", []),
        "ledger": sup.room.held_by_gpu(),
        "pressure_level": sup.pressure.level,
        "degraded": 1 if sup.degraded() else 0,
        "config_generation": sup.config_generation,
    }
