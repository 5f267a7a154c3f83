"""A new configuration applied to the fleet: workers added and removed, replicas kept, added, retired,
or replaced one at a time; unchanged replicas keep running. Part of the fleet (it writes its records)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import structlog

from ..aio import wait_quietly
from ..config import Settings, WorkerSpec
from ..errors import Rejected
from ..states import WorkerState

if TYPE_CHECKING:
    from .core import Fleet
    from .group import WorkerGroup
    from .replica import Replica

log = structlog.get_logger("supervisor.fleet")


@dataclass
class ReloadSummary:
    """What a reload did to the fleet (replicas named worker/index), for the config_reloaded log line."""

    workers_added: list[str] = field(default_factory=list)
    workers_removed: list[str] = field(default_factory=list)
    replicas_added: list[str] = field(default_factory=list)
    replicas_retired: list[str] = field(default_factory=list)
    replicas_replaced: list[str] = field(default_factory=list)  # a changed command/env: a new process each

    def fields(self) -> dict:
        """The log fields: worker_replaced only when a running replica gets a new process."""
        return {"worker_replaced": bool(self.replicas_replaced),
                **{k: v for k, v in asdict(self).items() if v}}


def apply(fleet: Fleet, settings: Settings) -> ReloadSummary:
    """Add, remove and reconfigure workers and replicas. Says what it did: which workers came and went,
    which replicas were added, retired or are being replaced."""
    fleet.settings = settings
    fleet.room.settings = settings
    done = ReloadSummary()
    for name in [n for n in fleet.groups if n not in settings.fleet]:
        g = fleet.groups.pop(name)
        done.workers_removed.append(name)
        for r in g.replicas:
            retire(fleet, r)
            done.replicas_retired.append(r.name)
        g.queue.fail_waiting(lambda n=name: Rejected(
            "worker_unavailable", f"worker {n!r} was removed by a configuration reload", 1.0))
    for name, spec in settings.fleet.items():
        g = fleet.groups.get(name)
        if g is None:
            g = fleet.add_group(name, spec)
            done.workers_added.append(name)
            done.replicas_added += [r.name for r in g.replicas]
        else:
            _reconfigure(fleet, g, spec, done)
    return done


def _reconfigure(fleet: Fleet, g: WorkerGroup, spec: WorkerSpec, done: ReloadSummary) -> None:
    settings = fleet.settings
    g.queue.configure(settings.queue)
    g.concurrency = spec.concurrency or settings.queue.concurrency
    for r in g.replicas:
        r.breaker.reconfigure(settings.breaker)
    old_spec, g.spec = g.spec, spec
    if spec.models != old_spec.models:
        g.discovered = ()
        g.models_read = False  # what it serves is asked again (below, or at its next start)
        g.models_missing = None
        serving = g.serving()
        if serving:  # no restart follows (models is a fleet-level key): read them from it now
            fleet.tasks.spawn(fleet.read_models(g, serving[0]))
    # replicas by placement: keep those still wanted, retire the rest, add the new ones
    want = list(fleet.placements(g.name, spec))
    keep: list[Replica] = []
    for r in g.replicas:
        if r.gpu in want:
            keep.append(r)
            want.remove(r.gpu)
        else:
            retire(fleet, r)
            done.replicas_retired.append(r.name)
    used = {r.index for r in keep}
    for gpu in want:
        idx = next(i for i in range(len(keep) + len(want) + 1) if i not in used)
        used.add(idx)
        r = fleet.new_replica(g, idx, gpu)
        keep.append(r)
        done.replicas_added.append(r.name)
        if fleet.started:
            fleet.run(r)
    g.replicas = sorted(keep, key=lambda r: r.index)
    stale = [r for r in g.replicas if r.spec.lifecycle() != spec.lifecycle() or r.state is WorkerState.FAILED]
    if stale:
        fleet.tasks.spawn(_roll(fleet, g, stale, spec))
        done.replicas_replaced += [r.name for r in stale]
    for r in g.replicas:
        if r not in stale:
            _respec(r, spec, settings.drain.timeout_s)  # no restart: fleet-level keys only
    g.refresh()


def _respec(r: Replica, spec: WorkerSpec, drain_timeout_s: float) -> None:
    old, r.spec = r.spec, spec
    assert r.lifecycle is not None
    r.lifecycle.reconfigured(old, drain_timeout_s)


async def _roll(fleet: Fleet, g: WorkerGroup, stale: list[Replica], spec: WorkerSpec) -> None:
    """Replace a changed worker one replica at a time: with N replicas, N - 1 keep serving."""
    for r in stale:
        if r not in g.replicas:
            continue
        was_up = r.state is not WorkerState.UNLOADED
        _respec(r, spec, fleet.settings.drain.timeout_s)
        if not was_up or len(g.replicas) == 1:
            continue
        deadline = time.monotonic() + spec.startup_timeout_s + fleet.settings.drain.timeout_s + spec.stop_grace_s
        while (left := deadline - time.monotonic()) > 0:
            moved = r.moved
            if r.serving or r.state in (WorkerState.FAILED, WorkerState.UNLOADED, WorkerState.STOPPED):
                break
            await wait_quietly(moved.wait(), left)


def retire(fleet: Fleet, r: Replica) -> None:
    """Drain and stop a replica for good (a reload removed it)."""
    fleet.retiring.append(r)
    assert r.lifecycle is not None
    lc = r.lifecycle
    lc.retire()
    log.info("replica_retiring", worker=r.worker, replica=r.index, gpu=r.gpu)

    async def reap() -> None:
        await lc.stopped.wait()
        if r.task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await r.task
        if r in fleet.retiring:
            fleet.retiring.remove(r)
        log.info("replica_retired", worker=r.worker, replica=r.index)

    if r.task is not None:
        fleet.tasks.spawn(reap())
    else:
        fleet.retiring.remove(r)
