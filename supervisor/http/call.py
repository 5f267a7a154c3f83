"""A request's own facts (`Call`) and the one way its routing facts are planned, for an HTTP request and a
job alike (`CallPlanner`): level, route, worker group, pool, deadline and retry policy."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..budgets.metering import json_document
from ..errors import Rejected
from ..fairness import client_key

if TYPE_CHECKING:
    from ..budgets.core import Charge
    from ..config import Route, Settings
    from ..fleet import Fleet, WorkerGroup
    from ..jobs.model import JobRequest
    from ..trace_spans import Trace

NO_WORKER = "none"  # the worker label of a request refused before it had one
_UNREAD: Any = object()


class Call:
    """One request's own facts, from arrival to answer."""

    __slots__ = ("rid", "t0", "method", "path", "level", "route", "group", "pool", "gpu_mb", "queue_limit",
                 "deadline", "body", "retry_ok", "max_attempts", "attempt", "queued_s", "hangs", "client",
                 "worker_label", "model", "continue_sent", "peer", "session", "blocks", "affinity_read", "trace",
                 "charge", "cost", "_doc")

    def __init__(self, rid: str, t0: float, method: str, path: str, level: int):
        self.rid = rid
        self.t0 = t0
        self.method = method
        self.path = path
        self.level = level  # -1: not asked for, the route decides (see CallPlanner.plan)
        self.route: Route | None = None
        self.group: WorkerGroup | None = None
        self.pool = "default"
        self.gpu_mb = 0
        self.queue_limit = 0.0
        self.deadline: float | None = None
        self.body: bytes | None = None  # None: streamed through to the worker, never held
        self.retry_ok = False
        self.max_attempts = 1
        self.attempt = 0
        self.queued_s = 0.0
        self.hangs = 0
        self.client: str | None = None
        self.worker_label = NO_WORKER
        self.model: str | None = None
        self.continue_sent = False
        self.peer: str | None = None  # the client's address (who a 500 was for, without a fairness key)
        self.session: str | None = None  # session affinity: its session header's value (else the body's user)
        self.blocks: list[bytes] | None = None  # prefix affinity: the prompt's chain-hashed blocks
        self.affinity_read = False  # the body was read for the above
        self.trace: Trace | None = None  # its spans, when tracing is on
        self.charge: Charge | None = None  # its client's budget (supervisor.budgets), when clients are configured
        self.cost = 1.0  # what fairness (DRR) charges it: 1 a request, or its estimate with budgets on
        self._doc: Any = _UNREAD  # the held body as JSON, see document()

    def document(self) -> Any:
        """The held body parsed as a JSON document (None when it is not one, or no body is held), parsed
        once for all who read it: model routing, affinity, the budget's estimate."""
        doc = self._doc
        if doc is _UNREAD:
            body = self.body
            if body is None:
                return None  # (not held yet, or streamed through: not kept as read)
            doc = self._doc = json_document(body) if body else None
        return doc

    def forget_document(self) -> None:
        """Its readers are done: the parsed body is not kept (the body itself is, for a retry)."""
        self._doc = _UNREAD


def body_model(body: bytes) -> str | None:
    """The JSON body's `model`, if it is a JSON object that names one (see model_of)."""
    return model_of(json_document(body) if body else None)


def model_of(data: Any) -> str | None:
    """A parsed body's `model`. A body that is not a JSON object, or names none, routes by path; a `model`
    that is not a string is the client's error."""
    if not isinstance(data, dict):
        return None
    m = data.get("model")
    if m is None:
        return None
    if not isinstance(m, str):
        raise Rejected("bad_request", f"model: must be a string naming a served model, not {type(m).__name__}")
    return m


class CallPlanner:
    """A call's routing facts from plain inputs: the settings' priority levels, routes and retry policy,
    and the fleet's worker groups and the models they serve."""

    def __init__(self, settings: Settings, fleet: Fleet):
        self.fleet = fleet
        self.derive(settings)

    def derive(self, s: Settings) -> None:
        self.settings = s
        self.priority_header = s.queue.priority_header
        self.timeout_header = s.queue.timeout_header
        self.level_names = s.queue.priorities
        self._level_index = {n: i for i, n in enumerate(self.level_names)}
        self.default_level = self._level_index[s.queue.default_priority]
        self._level_timeouts = [s.queue.level_timeout(n) for n in self.level_names]
        self._allowed_levels = ", ".join(self.level_names)
        self._retry_methods = frozenset(s.retry.methods)
        self._model_routes = any(r.model is not None for r in s.routes)
        self._fairness = s.queue.fairness if s.queue.fairness.key is not None else None
        self.models_changed()

    def models_changed(self) -> None:
        """Whether routing reads the JSON body's `model`: a route names one, a worker declares models, or
        several workers serve models (declared or discovered: with one worker, every request goes to it
        anyway, and the worker answers a name it does not know itself). Kept in step by the fleet when
        discovery changes what is served, never asked per request."""
        groups = self.fleet.groups.values()
        self.by_model = (self._model_routes or any(g.spec.models for g in groups)
                         or (len(groups) > 1 and bool(self.fleet.served_models())))

    # -- the inputs, one at a time ---------------------------------------------------------------
    def header_level(self, raw: str | None) -> int:
        """The priority header's level; -1 without the header (the route decides, once known)."""
        if raw is None:
            return -1
        v = raw.strip()
        idx = self._level_index.get(v)
        if idx is None and v.isdigit() and int(v) < len(self.level_names):
            idx = int(v)
        if idx is None:
            raise Rejected("bad_request", f"{self.priority_header}: {raw[:64]!r} is not a priority; use one of "
                           f"{self._allowed_levels} or an index 0..{len(self.level_names) - 1} (0 is highest)")
        return idx

    def named_level(self, name: str | None) -> int:
        """A job's stored priority name; one not (or no longer) configured is the default level."""
        return self._level_index.get(name, self.default_level)

    def client(self, headers: Mapping[str, str], peer: str | None) -> str | None:
        """The request's fairness key (hashed), or None when fairness is off."""
        return None if self._fairness is None else client_key(self._fairness, headers, peer)

    def route(self, method: str, path: str, model: str | None = None) -> Route | None:
        s = self.settings
        return s.route_for(method, path, model) if s.routes else None

    def wants_model(self, route: Route | None) -> bool:
        """Whether the body's `model` may change where a request with this path route goes."""
        return self.by_model and (route is None or route.worker is None or self._model_routes)

    # -- the plan ----------------------------------------------------------------------------------
    def plan(self, call: Call, timeout: str | None = None, left: float | None = None, pinned: str | None = None,
             retry_ok: bool | None = None) -> None:
        """Fill in a call whose method, path, level, model and route are known: its worker group, pool
        and GPU need, its level (the route's, if it asked for none), its queue limit and deadline, and
        whether a worker death may send it again.

        `timeout`: the request's timeout header (it can only shorten the route's deadline); `left`: the
        seconds left of a job's deadline, fixed at submission; `pinned`: the worker a job was submitted
        to (a route that names a worker wins); `retry_ok`: a job's stored answer (else the route's, else
        the method's)."""
        self._place(call, pinned)
        self._limit(call, timeout, left)
        if retry_ok is None:
            route = call.route
            retry_ok = route.retry if route is not None and route.retry is not None \
                else call.method in self._retry_methods
        call.retry_ok = retry_ok
        call.max_attempts = self.settings.retry.max_attempts if retry_ok else 1

    def job_call(self, req: JobRequest, rid: str, wall_now: float) -> Call:
        """A stored job's call, planned the same way as a request's (`wall_now`: time.time())."""
        path = req.target.split("?", 1)[0]
        call = Call(rid, time.monotonic(), req.method, path, self.named_level(req.priority))
        call.body = req.body
        call.client = req.fairness_key
        call.model = model_of(call.document()) if self.by_model else None
        call.route = self.route(call.method, path, call.model)
        left = None if req.deadline_at is None else req.deadline_at - wall_now
        self.plan(call, left=left, pinned=req.worker, retry_ok=req.retry_safe)
        routing = call.group.spec.routing  # type: ignore[union-attr]
        if routing.affinity == "session":  # the stored request's session header (else its body's user)
            name = routing.session_header.lower()
            call.session = next((v for k, v in req.headers if k.lower() == name and v), None)
        return call

    def _place(self, call: Call, pinned: str | None) -> None:
        """The worker group and the route's policy for this call."""
        fleet = self.fleet
        route = call.route
        group = None
        if route is not None and route.worker is not None:
            group = fleet.groups.get(route.worker)
        else:
            if pinned is not None:
                group = fleet.groups.get(pinned)
            if group is None and call.model is not None:
                group = fleet.group_for_model(call.model)
                if group is None:
                    group = self._unknown_model(call.model)
        if group is None:
            group = next(iter(fleet.groups.values()))
        call.group = group
        call.worker_label = group.name
        if route is not None:
            call.pool = route.pool
            call.gpu_mb = route.gpu_memory_mb

    def _unknown_model(self, model: str) -> WorkerGroup:
        # a worker whose models are not known yet (still starting) may serve this one; an on-demand
        # one that declares none is started by its route alone, never by a name it may not know
        fleet = self.fleet
        for g in fleet.groups.values():
            if not g.models_known and g.spec.start == "eager":
                return g
        raise Rejected("model_not_found", f"model {model!r} is not served here; "
                       f"served models: {', '.join(fleet.served_models())}")

    def _limit(self, call: Call, timeout: str | None, left: float | None) -> None:
        route = call.route
        if call.level < 0:
            call.level = (self._level_index[route.priority] if route is not None and route.priority is not None
                          else self.default_level)
        call.queue_limit = self._level_timeouts[call.level]
        total = route.timeout_s if route is not None else None
        if timeout is not None:
            t = self._seconds(timeout)
            call.queue_limit = min(call.queue_limit, t)
            total = t if total is None else min(total, t)
        elif left is not None:
            if left <= 0:
                raise Rejected("queue_timeout", "the job's deadline (X-Request-Timeout at submission) passed")
            call.queue_limit = min(call.queue_limit, left)
            total = left  # the route's timeout_s counted at submission, when the deadline was fixed
        call.deadline = call.t0 + total if total is not None else None

    def _seconds(self, raw: str) -> float:
        try:
            t = float(raw)
        except ValueError:
            t = math.nan
        if not (t > 0) or not math.isfinite(t):
            raise Rejected("bad_request", f"{self.timeout_header}: {raw[:64]!r} is not a number of seconds; "
                           "use a positive number such as 2.5 (it can only shorten the policy's deadline)")
        return t
