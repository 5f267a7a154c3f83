"""Which replica of a worker takes a call (`GroupRouter`), and the scrapes of each engine's own load
(`SignalScrapers`): least in flight, or session or prefix affinity (DESIGN: Choosing a replica).

Affinity never costs availability: only replicas that admit now and have a free slot are candidates, so a
dead, draining, unloaded or breaker-open replica is never chosen for its cache, and a retry after a worker
death picks again among those left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog

from .affinity import (
    LEAST_LOADED,
    SESSION,
    Candidate,
    PrefixIndex,
    PrefixRule,
    avoid_full,
    choose_least,
    choose_prefix,
    choose_session,
    prompt_blocks,
    prompt_text,
)
from .signals import EngineReading, SignalScraper, signal_names

if TYPE_CHECKING:
    from ..config import LoadSignals
    from ..fleet import Fleet, Replica, WorkerGroup
    from ..http.call import Call
    from ..upstream import UpstreamPool

log = structlog.get_logger("supervisor.routing")

KV_FULL = 0.95  # an engine whose KV cache is fuller than this is avoided while another has room


class GroupRouter:
    """The replica choice of one worker group: its prefix indexes (one per replica, emptied when the
    replica's process changes) and the engine readings of its scraper, if any."""

    def __init__(self, worker: str):
        self.worker = worker
        self.scraper: SignalScraper | None = None
        # replica index -> (its process generation, the bound, its index)
        self._indexes: dict[int, tuple[int, int, PrefixIndex]] = {}
        self._rr = 0

    def pick(self, g: WorkerGroup, call: Call, now: float) -> tuple[Replica | None, str]:
        """The replica for this attempt of `call` and why (a routing decision label); None when no
        replica can take it now."""
        routing = g.spec.routing
        reps = g.replicas
        self._rr += 1
        if len(reps) == 1:
            r = reps[0]
            return (r if r.can_take(now) else None), LEAST_LOADED
        reps = [r for r in reps if r.can_take(now)]
        if not reps:
            return None, LEAST_LOADED
        # a replica full of its own requests is no candidate while another has a free slot (the group's
        # slots are shared by all its replicas)
        reps = [r for r in reps if r.inflight < g.concurrency] or reps
        readings = [self._reading(r, now) for r in reps]
        loads = [r.inflight + ((rd.waiting or 0.0) if rd is not None else 0.0) for r, rd in zip(reps, readings)]
        full = [rd is not None and rd.kv_usage is not None and rd.kv_usage > KV_FULL for rd in readings]
        if routing.affinity != "none":
            self._read_body(call, routing.affinity)
        if routing.affinity == "session" and call.session is not None:
            cands = [Candidate(r.name, load) for r, load in zip(reps, loads)]
            return reps[choose_session(call.session, cands)], SESSION
        if routing.affinity == "prefix" and call.blocks is not None:
            p = routing.prefix
            indexes = [self._index(r, p.max_bytes) for r in reps]
            blocks = call.blocks
            cands = [Candidate(r.name, load, ix.match(blocks), ix.size_bytes, f)
                     for r, load, ix, f in zip(reps, loads, indexes, full)]
            keep = avoid_full(cands)
            rule = PrefixRule(min_match=p.min_match, balance_abs=p.balance_abs, balance_rel=p.balance_rel)
            i, decision = choose_prefix([cands[k] for k in keep], len(blocks), rule, self._rr)
            indexes[keep[i]].insert(blocks)
            return reps[keep[i]], decision
        cands = [Candidate(r.name, load, kv_full=f) for r, load, f in zip(reps, loads, full)]
        keep = avoid_full(cands)
        return reps[keep[choose_least([cands[k] for k in keep], self._rr)]], LEAST_LOADED

    # -- what a replica is asked about ---------------------------------------------------------
    def _index(self, r: Replica, max_bytes: int) -> PrefixIndex:
        """Its prefix index: a new process has an empty engine cache, and a new bound a new index."""
        held = self._indexes.get(r.index)
        if held is None or held[0] != r.gen or held[1] != max_bytes:
            held = self._indexes[r.index] = (r.gen, max_bytes, PrefixIndex(max_bytes))
        return held[2]

    def _reading(self, r: Replica, now: float) -> EngineReading | None:
        s = self.scraper
        return None if s is None else s.reading((r.worker, r.index), now)

    @staticmethod
    def _read_body(call: Call, affinity: str) -> None:
        """The call's session (its header's, else the body's `user`) and prompt blocks, read from its JSON
        body once (the body is held when it is up to retry.max_body_bytes)."""
        if call.affinity_read:
            return
        call.affinity_read = True
        if affinity == "session" and call.session is not None:
            call.forget_document()
            return
        data = call.document()
        call.forget_document()  # (the last reader)
        if not isinstance(data, dict):
            return
        if affinity == "session":
            user = data.get("user")
            if isinstance(user, str) and user:
                call.session = user
        else:
            text = prompt_text(data)
            if text is not None:
                call.blocks = prompt_blocks(text)

    def status(self, r: Replica, now: float) -> dict:
        """What /status shows of a replica's routing: its prefix index size and the engine's last reading."""
        held = self._indexes.get(r.index)
        out: dict = {"prefix_index_bytes": held[2].size_bytes if held is not None and held[0] == r.gen else 0}
        rd = self._reading(r, now)
        out["engine"] = None if rd is None else {"waiting": rd.waiting, "running": rd.running,
                                                  "kv_usage": rd.kv_usage, "age_s": round(now - rd.at, 3)}
        return out


class SignalScrapers:
    """One scraper task per worker whose `load_signals` asks for one, kept in step with the settings."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self._running: dict[str, tuple[LoadSignals, asyncio.Task]] = {}

    def sync(self) -> None:
        """Start, restart (its settings changed) or stop each worker's scraper as the fleet's specs say."""
        groups = self.fleet.groups
        for name in list(self._running):
            g = groups.get(name)
            if g is None or g.spec.load_signals != self._running[name][0]:
                self._stop(name)
        for name, g in groups.items():
            ls = g.spec.load_signals
            if not ls.enabled or name in self._running:
                continue
            scraper = SignalScraper(signal_names(ls.preset, ls.waiting, ls.running, ls.kv_usage), ls.path,
                                    ls.interval_s, lambda g=g: _targets(g))
            g.router.scraper = scraper
            self._running[name] = (ls, asyncio.create_task(scraper.run(), name=f"load-signals-{name}"))

    def _stop(self, name: str) -> None:
        _, task = self._running.pop(name)
        task.cancel()
        g = self.fleet.groups.get(name)
        if g is not None:
            g.router.scraper = None

    async def aclose(self) -> None:
        tasks = [t for _, t in self._running.values()]
        for name in list(self._running):
            self._stop(name)
        await asyncio.gather(*tasks, return_exceptions=True)


def _targets(g: WorkerGroup) -> Iterable[tuple[tuple[str, int], UpstreamPool]]:
    for r in g.replicas:
        inc = r.current
        if r.serving and inc is not None:
            yield (r.worker, r.index), inc.pool
