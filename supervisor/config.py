"""The validated, immutable policy: YAML in, one frozen `Settings` object out, problems with key paths."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import shutil
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .jobs.settings import JobsSettings


def _url_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError("must start with '/'")
    return v


UrlPath = Annotated[str, AfterValidator(_url_path)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Ratio = Annotated[float, Field(gt=0, le=1)]

DEFAULT_WORKER_COMMAND = (
    "python", "-m", "model_worker", "--socket", "{socket}", "--model", "models/tiny-gpt2",
)
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        """Problems between this section's keys ('key: message' each), read from its plain mapping.

        Each check skips a key it cannot read (a key of the wrong type is its field's own problem), so
        `parse` can run them on the raw YAML of a section whose fields failed: one check-config run
        reports every problem, where pydantic would skip a model's checks after a field error.
        """
        return []

    @model_validator(mode="after")
    def _cross_keys(self) -> Any:
        if type(self)._problems.__func__ is not _Model._problems.__func__:
            _refuse(type(self)._problems(self.model_dump()))
        return self


def _refuse(problems: list[str]) -> None:
    """Raise every problem a validator found at once, one per line (`parse` splits them again)."""
    if problems:
        raise ValueError("\n".join(problems))


def _num(data: dict, model: type[BaseModel], key: str) -> float | None:
    """A number key of a raw section: its value, its default when absent, None when not a number."""
    v = data.get(key, model.model_fields[key].default)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _strs(v: Any) -> list[str] | None:
    """A raw list of strings, else None (a wrong type is that key's own problem)."""
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return list(v)
    return None


def _mapping(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


class Listen(_Model):
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    """TCP port (0 = pick a free one)."""


class Health(_Model):
    path: UrlPath = "/healthz"
    """The worker's health endpoint: 2xx when it can serve."""
    interval_s: PosFloat = 2.0
    """Seconds between probes (each on its own connection)."""
    timeout_s: PosFloat = 2.0
    """A probe slower than this has failed."""
    failures: PosInt = 3
    """Failed probes in a row that restart the worker (timeouts: reason hang, errors: reason health)."""


class Restart(_Model):
    backoff_initial_s: NonNegFloat = 0.5
    """First delay of the exponential backoff (with jitter) between unplanned restarts."""
    backoff_max_s: NonNegFloat = 30.0
    """Longest backoff delay."""
    max_restarts: NonNegInt = 10
    """More than this many restarts in window_s is a crash loop: state failed, breaker forced open, /readyz 503."""
    window_s: PosFloat = 300.0
    """The crash-loop window: a failed worker is held until it passes or a reload."""

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        lo, hi = _num(data, cls, "backoff_initial_s"), _num(data, cls, "backoff_max_s")
        return ["backoff_max_s must be >= backoff_initial_s"] if lo is not None and hi is not None and hi < lo else []


class Recycle(_Model):
    max_requests: NonNegInt = 0
    """Recycle (drain, stop, respawn; nothing lost) after this many requests; 0 = off."""
    max_requests_jitter: NonNegInt = 0
    """Up to this many extra requests, to spread recycles of several daemons apart."""
    max_rss_mb: NonNegInt = 0
    """Recycle when the worker process tree's resident memory passes this (a leak); 0 = off."""
    max_gpu_memory_mb: NonNegInt = 0
    """Recycle when the worker's GPU memory (NVML) passes this; 0 = off."""


class Progress(_Model):
    """A counter of the worker's own (e.g. generated tokens) that must move while it has work."""

    path: UrlPath = "/metrics"
    """Where the worker serves its Prometheus metrics."""
    metric: str
    """A counter that must move while the worker has work (e.g. generated tokens)."""
    stall_s: PosFloat = 60.0
    """Work waiting or in flight and the counter flat this long: hung (reason hang)."""

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", v):
            raise ValueError(f"{v!r} is not a Prometheus metric name")
        return v


class Worker(_Model):
    command: tuple[str, ...] = DEFAULT_WORKER_COMMAND
    """The service to keep alive; {socket}: its socket path, {python}: our interpreter."""
    env: dict[str, str] = {}
    """Extra environment for the worker."""
    cwd: str | None = None
    """Working directory (default: the supervisor's)."""
    startup_timeout_s: PosFloat = 300.0
    """Spawn to first healthy answer, else reason start_failure."""
    hang_timeout_s: PosFloat = 300.0
    """A request outstanding longer than this means the worker is stuck."""
    stall_timeout_s: PosFloat | None = None   # no byte on any request in flight this long: hung
    """No byte from the worker on any request in flight this long: hung (default: hang_timeout_s)."""
    progress: Progress | None = None
    """Optional: a counter of the worker's own that must move while it has work."""
    stop_grace_s: NonNegFloat = 10.0
    """SIGTERM to the process group, SIGKILL after this."""
    health: Health = Health()
    """Health probes."""
    restart: Restart = Restart()
    """Restart backoff and crash-loop detection."""
    recycle: Recycle = Recycle()
    """Planned replacement, gunicorn-style (drain first, nothing lost)."""

    @property
    def stall_s(self) -> float:
        return self.stall_timeout_s if self.stall_timeout_s is not None else self.hang_timeout_s

    @field_validator("command")
    @classmethod
    def _command(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or not v[0]:
            raise ValueError("must name a program to run")
        return v


WORKER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class PrefixAffinity(_Model):
    """SGLang's cache-aware rule: the longest cached prefix, unless the pool is unbalanced."""

    min_match: Ratio = 0.3
    """Prefer the replica whose cached prefix covers at least this share of the prompt."""
    balance_abs: NonNegFloat = 8
    """...unless the pool is unbalanced: load max - min over this..."""
    balance_rel: Annotated[float, Field(ge=1)] = 1.5
    """...and max over balance_rel x min: then the least loaded replica."""
    max_bytes: PosInt = 16 * 1024 * 1024
    """Bound of each replica's prefix index, in prompt bytes (least recently used dropped)."""


class Routing(_Model):
    """Which replica of a worker takes a request (DESIGN: Choosing a replica)."""

    affinity: Literal["none", "session", "prefix"] = "none"
    """none: least in flight; session: a session sticks to a replica; prefix: the replica that cached most
    of the prompt's beginning."""
    session_header: str = "X-Session-ID"
    """session: this header, else the JSON body's `user`, names the session."""
    prefix: PrefixAffinity = PrefixAffinity()
    """prefix: the cache-aware rule's thresholds and the index bound."""

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        h = data.get("session_header")
        if isinstance(h, str) and not _HEADER_TOKEN.fullmatch(h):
            return [f"session_header: {h!r} is not a header name"]
        return []


class LoadSignals(_Model):
    """The engine's own load, read from its Prometheus text off the request path."""

    preset: Literal["none", "vllm", "sglang", "tgi", "llamacpp"] = "none"
    """Metric names of an engine (none: no scraping unless a name below is given)."""
    path: UrlPath = "/metrics"
    """Where the engine serves its metrics, on the worker's socket."""
    interval_s: PosFloat = 0.5
    """How often each replica is read."""
    waiting: str | None = None
    """Metric of the engine's waiting requests (overrides the preset)."""
    running: str | None = None
    """Metric of the engine's running requests (overrides the preset)."""
    kv_usage: str | None = None
    """Metric of the engine's KV cache usage, 0..1 (overrides the preset)."""

    @property
    def enabled(self) -> bool:
        return self.preset != "none" or any(n is not None for n in (self.waiting, self.running, self.kv_usage))


def _endpoint(v: str) -> str:
    method, _, target = v.partition(" ")
    if method not in HTTP_METHODS or not target.startswith("/") or " " in target:
        raise ValueError(f"{v!r}: write it as 'METHOD /path?query', e.g. 'POST /sleep?level=1'")
    return v


Endpoint = Annotated[str, AfterValidator(_endpoint)]


SLEEP_MIN_RESIDENT_S = 1.0  # min_resident_s of a worker with `sleep` that sets none


class Sleep(_Model):
    """A worker's sleep mode (vLLM's names): put to sleep instead of stopped, woken instead of started."""

    sleep: Endpoint = "POST /sleep?level=1"
    """The call that puts it to sleep (vLLM: level 1 keeps the weights in host RAM, level 2 drops them)."""
    wake: Endpoint = "POST /wake_up"
    """The call that wakes it (bounded by startup_timeout_s)."""
    is_sleeping: Endpoint | None = "GET /is_sleeping"
    """Confirms a sleep or a wake ({"is_sleeping": true|false}); null: trust the 2xx."""
    gpu_memory_mb: NonNegInt = 0
    """What it still holds on its GPU while asleep; 0 = learned from NVML once asleep."""
    host_memory_mb: NonNegInt = 0
    """Host RAM it holds while asleep; 0 = its RSS."""
    after_idle_s: NonNegFloat = 0.0
    """Put an idle replica to sleep after this long; 0 = only to make room."""


class WorkerSpec(Worker):
    """One named worker of the fleet: the `worker` keys plus how many replicas, where, and when."""

    models: tuple[str, ...] = ()
    """OpenAI model names it serves; empty: read from its GET /v1/models once ready."""
    gpus: tuple[Annotated[int, Field(ge=0)], ...] | Literal["auto"] | None = None
    """One replica per listed GPU (CUDA_VISIBLE_DEVICES=<gpu>); `auto` = every GPU NVML sees."""
    replicas: PosInt | None = None
    """Replicas when `gpus` is not given."""
    concurrency: PosInt | None = None
    """Slots per replica."""
    start: Literal["eager", "on_demand"] = "eager"
    """eager, or on_demand (started by its first request)."""
    idle_unload_s: NonNegFloat = 0.0
    """Stop a replica idle this long (from the end of its last request); 0 = never."""
    gpu_memory_mb: NonNegInt = 0
    """What one replica needs on its GPU; 0 = learned from NVML (peak of its process tree)."""
    pinned: bool = False
    """Never evicted to make room for another worker."""
    min_resident_s: NonNegFloat = 5.0
    """How long a fresh (or freshly woken) replica stays before it may be evicted; default 5 s, or 1 s for a
    worker with `sleep` (a swap through sleep costs about a wake, not a load)."""
    max_starvation_s: PosFloat = 30.0
    """How long a replica may wait for room on its GPU before busy replicas there are drained for it."""
    routing: Routing = Routing()
    """Which replica takes a request: least in flight, or session or prefix affinity."""
    load_signals: LoadSignals = LoadSignals()
    """The engine's own load (waiting, running, KV usage) from its Prometheus text."""
    sleep: Sleep | None = None
    """Its sleep mode: a cheaper tier than stopping it (DESIGN: Sleeping workers); null: stopped only."""

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        problems = []
        gpus = data.get("gpus")
        if gpus is not None and data.get("replicas") is not None:
            problems.append("replicas: cannot be set together with gpus (gpus gives one replica per GPU)")
        if isinstance(gpus, (list, tuple)):
            if not gpus:
                problems.append("gpus: list at least one GPU index, or use `auto`")
            if all(isinstance(g, int) for g in gpus) and len(set(gpus)) != len(gpus):
                problems.append("gpus: each GPU may be listed once (one replica per GPU)")
        if any(not m for m in _strs(data.get("models")) or ()):
            problems.append("models: a model name cannot be empty")
        sleep, need = _mapping(data.get("sleep")), data.get("gpu_memory_mb")
        asleep = sleep.get("gpu_memory_mb")
        if isinstance(asleep, int) and isinstance(need, int) and 0 < need <= asleep:
            problems.append(f"sleep.gpu_memory_mb: {asleep} MiB asleep is not less than gpu_memory_mb ({need} MiB "
                            "awake): sleeping would free nothing")
        return problems

    @model_validator(mode="before")
    @classmethod
    def _sleep_defaults(cls, data: Any) -> Any:
        """A worker that sleeps can afford a short min_resident_s: its swaps cost a wake."""
        if isinstance(data, dict) and data.get("sleep") is not None and "min_resident_s" not in data:
            data = {**data, "min_resident_s": SLEEP_MIN_RESIDENT_S}
        return data

    def lifecycle(self) -> WorkerSpec:
        """The keys a running process depends on: a change here restarts replicas; the rest (placement,
        models, slots, on-demand policy) the fleet applies without a restart."""
        return self.model_copy(update={"gpus": None, "replicas": None, "models": (), "concurrency": None,
                                       "start": "eager", "idle_unload_s": 0.0, "pinned": False,
                                       "min_resident_s": 0.0, "max_starvation_s": 1.0, "gpu_memory_mb": 0,
                                       "routing": Routing(), "load_signals": LoadSignals(),
                                       "sleep": None})

    def placements(self, gpus_seen: int | None = None) -> tuple[int | None, ...]:
        """The GPU of each replica (None: no GPU pinned); `auto` takes every GPU NVML sees (at least one
        replica even without NVML)."""
        if self.gpus == "auto":
            return tuple(range(gpus_seen)) if gpus_seen else (None,)
        if isinstance(self.gpus, tuple):
            return self.gpus
        return (None,) * (self.replicas or 1)


class Level(_Model):
    timeout_s: PosFloat | None = None
    """Queue wait limit of this level (default: queue.timeout_s)."""
    max_size: PosInt | None = None
    """Bound of this level (default: queue.max_size)."""


class Pool(_Model):
    concurrency: PosInt = 1
    """Slots of this pool."""




class Fairness(_Model):
    """Deficit round robin between clients inside a priority level (see supervisor/fairness.py)."""

    key: str | None = None  # "header:<Name>" or "ip"; None keeps one FIFO per level
    """'header:<Name>' or 'ip'; null keeps one FIFO per level."""
    weights: dict[str, PosFloat] = {}  # by the key's clear value; a key not named weighs 1
    """Weights by the key's value; a value not named weighs 1."""
    max_queued_per_key: NonNegInt = 0  # 0 = no per-key bound
    """Requests one key may have waiting; past it that client alone gets 429 queue_full (0 = no bound)."""

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is None or v == "ip":
            return v
        name = v.removeprefix("header:")
        if name == v or not _HEADER_TOKEN.fullmatch(name):
            raise ValueError(f"{v!r}: must be 'ip' or 'header:<Name>' with a valid header name")
        return v

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        if data.get("key") is None and (data.get("weights") or data.get("max_queued_per_key")):
            return ["weights and max_queued_per_key need a key ('header:<Name>' or 'ip')"]
        return []


class ClientBudget(_Model):
    """One client's budget (see supervisor/budgets/); 0 = unlimited."""

    tokens_per_minute: NonNegInt = 0
    """Tokens (as `clients.count` counts them) per minute, refilled continuously; past it 429 rate_limited."""
    requests_per_minute: NonNegInt = 0
    """Requests per minute, refilled continuously; past it 429 rate_limited."""
    max_parallel: NonNegInt = 0
    """Requests of this client queued or running at once, per daemon; past it 429 rate_limited."""
    name: str | None = None
    """Under `keys`: the client's name in metrics and logs (default: the key value itself; set one when
    the key is a secret, such as an Authorization value)."""


def _store_url(v: str) -> str:
    if v == "memory":
        return v
    if v.startswith("sqlite:///"):
        if len(v) == len("sqlite:///"):
            raise ValueError("sqlite:///PATH needs a path")
        return v
    if v.startswith(("redis://", "rediss://")):
        try:
            u = urlsplit(v)
            port_ok = u.port is None or u.port > 0
        except ValueError as exc:
            raise ValueError(f"{v!r}: {exc}") from None
        db = u.path.strip("/")
        if not u.hostname or not port_ok or (db and not db.isdigit()):
            raise ValueError(f"{v!r}: use redis://HOST:PORT/DB (DB a number)")
        return v
    raise ValueError(f"{v!r}: use memory, sqlite:///PATH or redis://HOST:PORT/DB")


class Clients(_Model):
    """Client budgets in tokens and requests, and the usage record (see supervisor/budgets/)."""

    default: ClientBudget = ClientBudget()
    """The budget of a client not named in `keys`."""
    keys: dict[str, ClientBudget] = {}
    """Budgets by the clear value of queue.fairness.key (hashed before it is stored); the names label metrics."""
    count: Literal["total", "output", "input"] = "total"
    """Which tokens a budget counts: total | output | input."""
    store: Annotated[str, AfterValidator(_store_url)] = "memory"
    """Where budgets and usage live: memory | sqlite:///PATH | redis://HOST:PORT/DB (shared by daemons)."""
    retention_s: PosFloat = 604800.0
    """How long usage rows are kept."""

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        if _mapping(data.get("default")).get("name") is not None:
            return ["default.name: only a client listed under `keys` has a name (unlisted ones are `other`)"]
        return []


class Queue(_Model):
    concurrency: PosInt = 1
    """Slots of the `default` pool: requests at the worker at once."""
    max_size: PosInt = 1000
    """Total waiting requests, all levels; past it 429 queue_full."""
    priorities: tuple[str, ...] = ("critical", "high", "normal", "low")
    """Level names, highest first; served strictly in this order."""
    default_priority: str = "normal"
    """The level of a request that names none."""
    priority_header: str = "X-Priority"
    """Header with a level name or its index (0 = highest)."""
    timeout_header: str = "X-Request-Timeout"
    """Header with a deadline in seconds; it may only shorten the policy's."""
    levels: dict[str, Level] = {}
    """Per-level queue wait limit (timeout_s) and bound (max_size)."""
    timeout_s: PosFloat = 60.0
    """Default queue wait limit; past it 503 queue_timeout."""
    pools: dict[str, Pool] = {}
    """Extra named slot pools (besides `default`) for routes that do not need the GPU."""
    fairness: Fairness = Fairness()
    """Fair sharing between clients within a priority level."""

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        problems = []
        prios = _strs(data.get("priorities", cls.model_fields["priorities"].default))
        if prios is not None:
            if not prios:
                problems.append("priorities: at least one level is needed")
            if len(set(prios)) != len(prios):
                problems.append("priorities: names must be unique")
            for name in prios:
                if not name or name.isdigit():
                    problems.append(f"priorities: {name!r} is not a valid level name (digits mean an index)")
            default = data.get("default_priority", cls.model_fields["default_priority"].default)
            if prios and isinstance(default, str) and default not in prios:
                problems.append(f"default_priority: {default!r} is not one of {prios}")
            for name in _mapping(data.get("levels")):
                if isinstance(name, str) and name not in prios:
                    problems.append(f"levels.{name}: not one of priorities {prios}")
        if "default" in _mapping(data.get("pools")):
            problems.append("pools.default: the default pool is sized by queue.concurrency")
        return problems

    def level_timeout(self, level: str) -> float:
        lv = self.levels.get(level)
        return lv.timeout_s if lv and lv.timeout_s is not None else self.timeout_s

    def level_max_size(self, level: str) -> int:
        lv = self.levels.get(level)
        return lv.max_size if lv and lv.max_size is not None else self.max_size

    def pool_sizes(self) -> dict[str, int]:
        sizes = {"default": self.concurrency}
        sizes.update({name: p.concurrency for name, p in self.pools.items()})
        return sizes


class Route(_Model):
    path: UrlPath
    """Path prefix this route matches."""
    methods: tuple[str, ...] | None = None
    """HTTP methods it matches (default: all)."""
    priority: str | None = None
    """Priority level of matching requests."""
    pool: str = "default"
    """Slot pool its requests use."""
    timeout_s: PosFloat | None = None
    """Whole-request deadline; past it 504 timeout."""
    retry: bool | None = None
    """Safe to repeat after a worker death."""
    gpu_memory_mb: NonNegInt = 0
    """Dispatch only when this much GPU memory is free."""
    worker: str | None = None
    """The worker that serves matching requests."""
    model: str | None = None
    """Matches the JSON body's `model`."""

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        up = tuple(m.upper() for m in v)
        bad = [m for m in up if m not in HTTP_METHODS]
        if bad:
            raise ValueError(f"unknown HTTP method(s) {bad}")
        return up


class Retry(_Model):
    max_attempts: PosInt = 2
    """Tries in all, the first included."""
    methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
    """Methods safe to repeat unless a route says otherwise."""
    max_body_bytes: NonNegInt = 1_048_576
    """Bodies up to this are buffered (and so can be sent again)."""

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        up = tuple(m.upper() for m in v)
        bad = [m for m in up if m not in HTTP_METHODS]
        if bad:
            raise ValueError(f"unknown HTTP method(s) {bad}")
        return up


class Breaker(_Model):
    window: PosInt = 20
    """The last N outcomes."""
    min_calls: PosInt = 5
    """No verdict on fewer."""
    failure_rate: Ratio = 0.5
    """Open at this share of failures (connection errors, 5xx, timeouts, OOM)."""
    slow_call_s: PosFloat | None = None
    """A call slower than this counts as slow (null = off)."""
    slow_call_rate: Ratio = 1.0
    """Open at this share of slow calls."""
    open_s: PosFloat = 5.0
    """Open this long, doubling on each re-open ..."""
    open_max_s: PosFloat = 60.0
    """... up to this."""
    half_open_probes: PosInt = 1
    """Then let this many through: success closes, failure re-opens."""

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        problems = []
        open_s, open_max_s = _num(data, cls, "open_s"), _num(data, cls, "open_max_s")
        if open_s is not None and open_max_s is not None and open_max_s < open_s:
            problems.append("open_max_s must be >= open_s")
        window, min_calls = _num(data, cls, "window"), _num(data, cls, "min_calls")
        if window is not None and min_calls is not None and min_calls > window:
            problems.append("min_calls must be <= window")
        return problems


class Thresholds(_Model):
    soft: Ratio = 0.85
    """used/total at which pressure is soft."""
    hard: Ratio = 0.93
    """used/total at which pressure is hard."""
    critical: Ratio = 0.97
    """used/total at which pressure is critical."""

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        soft, hard, critical = (_num(data, cls, k) for k in ("soft", "hard", "critical"))
        if soft is not None and hard is not None and critical is not None and not soft < hard < critical:
            return ["thresholds must rise: soft < hard < critical"]
        return []


class SoftAction(_Model):
    shed_below: str | None = "high"
    """503 overloaded for priorities below this level."""
    concurrency: PosInt | None = None
    """Lower the default pool's slots to this."""


class HardAction(_Model):
    pause: bool = True
    """Hold dispatch (the queue holds)."""
    cleanup: bool = True
    """POST the worker's /cleanup."""
    shed_below: str | None = None
    """503 overloaded for priorities below this level."""


class CriticalAction(_Model):
    restart_after_s: NonNegFloat | None = 10.0
    """Held this long: restart the worker (reason pressure); null = never."""
    shed_below: str | None = None
    """503 overloaded for priorities below this level."""


class Actions(_Model):
    soft: SoftAction = SoftAction()
    """What soft pressure does."""
    hard: HardAction = HardAction()
    """What hard pressure does."""
    critical: CriticalAction = CriticalAction()
    """What critical pressure does."""


class Gpu(_Model):
    enabled: Literal["auto", True, False] = "auto"
    """auto | true | false."""
    poll_interval_s: PosFloat = 1.0
    """Seconds between NVML readings."""
    thresholds: Thresholds = Thresholds()
    """used/total of any of the worker's GPUs."""
    hysteresis: Annotated[float, Field(ge=0, lt=0.5)] = 0.02
    """A level is left only this far below its threshold."""
    actions: Actions = Actions()
    """What each pressure level does."""
    reserve_mb: NonNegInt = 0
    """Per GPU, left to everything that is not ours."""
    budget_mb: dict[Annotated[int, Field(ge=0)], PosInt] = {}
    """{gpu index: MiB} cap per GPU; also describes a GPU where NVML cannot."""
    settle_timeout_s: NonNegFloat = 10.0
    """After a stop, wait this long at most for NVML to show the memory back."""
    host_reserve_mb: NonNegInt = 2048
    """Host RAM the ledger never plans to fill with sleeping workers."""


class Host(_Model):
    thresholds: Thresholds = Thresholds(soft=0.90, hard=0.95, critical=0.98)
    """used/total of the host's RAM (psutil); the same actions as gpu."""


class Fallback(_Model):
    cpu_after_oom_restarts: NonNegInt = 0
    """After this many OOM restarts respawn with `env` (0 = off); X-Degraded says so."""
    env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": ""}
    """The fallback's environment (e.g. hide the GPUs)."""


class Limits(_Model):
    max_body_bytes: PosInt = 16 * 1024 * 1024
    """Larger request bodies: 413 payload_too_large."""
    client_timeout_s: PosFloat = 60.0
    """Idle keep-alive client connections are closed after this; a request head must arrive within it; a
    client that takes none of an answer's bytes this long is dropped."""
    max_header_bytes: PosInt = 8190
    """Request line / header field size; a longer request line: 414, a longer header field: 431."""
    buffer_bytes: NonNegInt = 4 * 1024 * 1024       # a worker answer up to this is held in memory ...
    """A worker answer up to this is held in memory ..."""
    spool_bytes: NonNegInt = 256 * 1024 * 1024      # ... and then on disk, so its slot frees at once
    """... and then on disk, so its slot frees at once."""
    spool_dir: str | None = None                     # where answers spill (default: the system temp dir)
    """Where answers spill to disk (default: the system temp dir)."""
    worker_head_bytes: PosInt = 65536               # a worker's answer head larger than this is refused
    """A worker's answer head larger than this is refused."""


class Drain(_Model):
    timeout_s: NonNegFloat = 30.0
    """On SIGTERM: finish what is queued and running within this."""


class Admin(_Model):
    listen: Listen | None = None
    """A listener of its own for /healthz /readyz /status /metrics /ui (null: the main one)."""
    token_file: str | None = None
    """If set, /status, /metrics and /ui need Authorization: Bearer <token>."""


class Logging(_Model):
    format: Literal["json", "console"] = "json"
    """json | console."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """debug | info | warning | error."""
    access: bool = False
    """One line per request (costs throughput)."""


class Tracing(_Model):
    endpoint: str | None = None
    """OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces (null: tracing off)."""
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Share of requests traced when the client sent no sampled traceparent (0..1)."""
    service_name: str = "gpu-supervisor"
    """The spans' service.name."""
    headers: dict[str, str] = {}
    """Sent with every export (e.g. an Authorization header for a hosted collector)."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL (the collector's OTLP/HTTP traces endpoint)")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not _HEADER_TOKEN.fullmatch(k)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an HTTP header name")
        return v


class Settings(_Model):
    listen: Listen = Listen()
    """Where clients connect."""
    runtime_dir: str | None = None
    """Where the workers' sockets live (mode 0700); default $RUNTIME_DIRECTORY or a temp dir."""
    state_dir: str | None = None       # job store dir; default $STATE_DIRECTORY, else ~/.local/state/gpu-supervisor
    """The job store's directory; default $STATE_DIRECTORY, else ~/.local/state/gpu-supervisor."""
    worker: WorkerSpec | None = None
    """One worker (a fleet of one named `default`); use either `worker` or `workers`."""
    worker_defaults: WorkerSpec | None = None
    """Any `worker` key, inherited by every worker in `workers`."""
    workers: dict[str, WorkerSpec] = {}
    """The fleet: named workers, each with one or more replicas."""
    queue: Queue = Queue()
    """Priority queue: levels, bounds, wait limits, slot pools, fairness."""
    routes: tuple[Route, ...] = ()
    """Request policies; the first match (path prefix, methods, model) wins."""
    retry: Retry = Retry()
    """Requests in flight when a worker dies."""
    breaker: Breaker = Breaker()
    """Circuit breaker: stop hammering a failing worker."""
    gpu: Gpu = Gpu()
    """GPU memory pressure from NVML (no NVML/GPU is a normal, logged mode) and the memory ledger."""
    host: Host = Host()
    """Host memory pressure."""
    fallback: Fallback = Fallback()
    """Respawn a worker that keeps running out of GPU memory on the CPU."""
    limits: Limits = Limits()
    """Request and answer size and time limits."""
    drain: Drain = Drain()
    """Shutdown: how long to finish what is held."""
    admin: Admin = Admin()
    """The supervisor's own endpoints: their listener and token."""
    logging: Logging = Logging()
    """Log format and level."""
    jobs: JobsSettings = JobsSettings()
    """Async jobs (Prefer: respond-async) and their store."""
    tracing: Tracing = Tracing()
    """OpenTelemetry traces over OTLP/HTTP (off unless `endpoint` is set)."""
    clients: Clients | None = None
    """Client budgets and usage (needs queue.fairness.key); null: none."""

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data: Any) -> Any:
        return _with_defaults(data)

    @property
    def fleet(self) -> dict[str, WorkerSpec]:
        """Every worker by name, in config order: `workers`, or the single `worker` named `default`."""
        if self.workers:
            return self.workers
        return {"default": self.worker or self.worker_defaults or WorkerSpec()}

    @property
    def first_worker(self) -> WorkerSpec:
        return next(iter(self.fleet.values()))

    @classmethod
    def _problems(cls, data: dict) -> list[str]:
        return _cross_problems(data)

    def route_for(self, method: str, path: str, model: str | None = None) -> Route | None:
        """The first route whose path prefix, methods and (if it names one) model match."""
        for r in self.routes:
            if (path.startswith(r.path) and (r.methods is None or method in r.methods)
                    and (r.model is None or r.model == model)):
                return r
        return None


def _with_defaults(data: Any) -> Any:
    """`worker_defaults` keys flow into every worker (a worker's own keys win); a file with no worker at
    all is the single-worker form with every default."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    if "worker" not in out and not out.get("workers"):
        out["worker"] = {}
    defaults = data.get("worker_defaults")
    if not isinstance(defaults, dict) or not defaults:
        return out
    if isinstance(data.get("workers"), dict):
        out["workers"] = {name: _deep_merge(defaults, spec) if isinstance(spec, dict) else spec
                          for name, spec in data["workers"].items()}
    if isinstance(data.get("worker"), dict):
        out["worker"] = _deep_merge(defaults, data["worker"])
    return out


def _validated(model: type[_Model], raw: Any) -> Any:
    """`raw` as a valid `model`, or None where it is not one (its problems are reported by its keys)."""
    try:
        return model.model_validate({} if raw is None else raw)
    except ValidationError:
        return None


def _cross_problems(data: dict) -> list[str]:
    """Problems between sections ('key.path: message' each): a route's worker, priority and pool, who
    serves which model, what fits on a GPU, which on-demand worker a request can reach. Reads the raw
    mapping (with `worker_defaults` flowed in), so each check runs whatever else is wrong."""
    problems: list[str] = []
    queue = _mapping(data.get("queue"))
    prios = _strs(queue.get("priorities", Queue.model_fields["priorities"].default))
    pools = queue.get("pools", {})
    pool_names = sorted({"default", *pools}) if isinstance(pools, dict) else None
    workers = data.get("workers")
    many = isinstance(workers, dict) and bool(workers)
    if data.get("worker") is not None and many:
        problems.append("worker: use either `worker` (one worker) or `workers` (a fleet), not both")
    fleet: dict[Any, Any] = dict(workers) if many else {"default": data.get("worker")}
    owner: dict[str, Any] = {}
    for name, spec in fleet.items():
        if many and isinstance(name, str) and not WORKER_NAME_RE.match(name):
            problems.append(f"workers.{name}: a worker name is 1-32 letters, digits, '_', '.', '-' "
                            "(it names sockets, log fields and metric labels)")
        for m in _strs(_mapping(spec).get("models")) or ():
            if m in owner:
                problems.append(f"workers.{name}.models: model {m!r} is already served by worker "
                                f"{owner[m]!r}; a model name belongs to one worker")
            owner[m] = name
    routes = data.get("routes")
    routed: set[str] = set()
    for i, r in enumerate(routes if isinstance(routes, (list, tuple)) else ()):
        r = _mapping(r)
        worker, prio, pool = r.get("worker"), r.get("priority"), r.get("pool", "default")
        if isinstance(worker, str):
            routed.add(worker)
            if worker not in fleet:
                problems.append(f"routes.{i}.worker: {worker!r} is not one of the workers {list(fleet)}")
        if isinstance(prio, str) and prios is not None and prio not in prios:
            problems.append(f"routes.{i}.priority: {prio!r} is not one of {prios}")
        if isinstance(pool, str) and pool_names is not None and pool not in pool_names:
            problems.append(f"routes.{i}.pool: {pool!r} is not one of {pool_names}")
    # Unrouted requests (and models no worker declares) go to the first worker, so it is always reachable;
    # any other on-demand worker that declares no models is started only by a route naming it.
    for name, spec in list(fleet.items())[1:]:
        spec = _mapping(spec)
        if spec.get("start") == "on_demand" and not spec.get("models") and name not in routed:
            problems.append(f"workers.{name}.start: an on_demand worker needs `models:` (the names it serves) "
                            f"or a route with `worker: {name}`, since it is started only by a request routed "
                            "to it")
    gpu = _validated(Gpu, data.get("gpu"))
    if gpu is not None:
        from .gpu_ledger import WorkerNeed, check_static_fit  # pure, no cycle: it imports nothing of ours
        specs = {name: _validated(WorkerSpec, spec) for name, spec in fleet.items()}
        needs = [WorkerNeed(f"workers.{n}" if many else "worker", w.gpu_memory_mb,
                            tuple(g for g in w.placements() if g is not None), w.pinned)
                 for n, w in specs.items() if w is not None]
        problems += check_static_fit(needs, gpu.budget_mb, gpu.reserve_mb)
    actions = _mapping(_mapping(data.get("gpu")).get("actions"))
    for lvl, action in (("soft", SoftAction), ("hard", HardAction), ("critical", CriticalAction)):
        shed = _mapping(actions.get(lvl)).get("shed_below", action.model_fields["shed_below"].default)
        if isinstance(shed, str) and prios is not None and shed not in prios:
            problems.append(f"gpu.actions.{lvl}.shed_below: {shed!r} is not one of {prios}")
    if data.get("clients") is not None and _mapping(queue.get("fairness")).get("key") is None:
        problems.append("clients: needs queue.fairness.key (who a client is: 'header:<Name>' or 'ip')")
    admin_listen = _mapping(data.get("admin")).get("listen")
    if admin_listen is not None:
        ours, main = _validated(Listen, admin_listen), _validated(Listen, data.get("listen"))
        if ours is not None and ours == main and main.port != 0:
            problems.append("admin.listen: must differ from listen")
    return problems


class ConfigError(Exception):
    """The file could not be turned into Settings; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class LoadedConfig:
    settings: Settings
    source: str
    digest: str


# -- reading the YAML: where each key is written, and how ------------------------------------------------
_MERGE_TAG = "tag:yaml.org,2002:merge"
Loc = tuple[str, ...]


@dataclass
class _Source:
    """What the YAML text says beside its data: the line of each key path, the text of each scalar, and
    the keys written twice in one mapping (YAML keeps the last one silently)."""

    lines: dict[Loc, int]
    scalars: dict[Loc, str]
    duplicates: list[tuple[Loc, str]]


def _read_source(text: str) -> _Source:
    src = _Source({}, {}, [])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return src

    def walk(node: yaml.Node, path: Loc, above: frozenset[int]) -> None:
        if id(node) in above:
            return  # an alias of an enclosing node
        above = above | {id(node)}
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, Any], int] = {}
            for k, v in node.value:
                if k.tag == _MERGE_TAG:
                    continue
                p = path + (str(k.value),)
                line = k.start_mark.line + 1
                if isinstance(k, yaml.ScalarNode):
                    if (k.tag, k.value) in first:
                        src.duplicates.append((p, f"duplicate key, also at line {first[k.tag, k.value]}: YAML "
                                                  "keeps only the last one and drops the other's values; "
                                                  "write the key once"))
                    first.setdefault((k.tag, k.value), line)
                src.lines[p] = line  # the last one is the one whose values count
                if isinstance(v, yaml.ScalarNode):
                    src.scalars[p] = v.value
                walk(v, p, above)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (str(i),)
                src.lines[p] = v.start_mark.line + 1
                if isinstance(v, yaml.ScalarNode):
                    src.scalars[p] = v.value
                walk(v, p, above)

    if root is not None:
        walk(root, (), frozenset())
    return src


def _line_for(lines: dict[Loc, int], loc: Loc) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


# -- the declared type of every value -------------------------------------------------------------------
def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _nodes(tp: Any, value: Any, loc: tuple = ()) -> Iterator[tuple[Any, Any, tuple]]:
    """Every value of the raw data with the type its key declares, through models, lists, mappings and
    optional types: (type, value, key path)."""
    tp = _unwrap(tp)
    if _is_union(tp):
        arms = [_unwrap(a) for a in get_args(tp)]
        arm = next((a for a in arms if isinstance(value, dict) and (_is_model(a) or get_origin(a) is dict)
                    or isinstance(value, list) and get_origin(a) in (tuple, list)), None)
        if arm is None:
            yield tp, value, loc
            return
        tp = arm
    yield tp, value, loc
    origin, args = get_origin(tp), get_args(tp)
    if _is_model(tp) and isinstance(value, dict):
        for k, v in value.items():
            field = tp.model_fields.get(k) if isinstance(k, str) else None
            if field is not None:
                yield from _nodes(field.annotation, v, loc + (k,))
    elif origin in (tuple, list) and isinstance(value, list) and args:
        for i, v in enumerate(value):
            yield from _nodes(args[0] if args[-1] is Ellipsis or origin is list else args[min(i, len(args) - 1)],
                              v, loc + (i,))
    elif origin is dict and isinstance(value, dict) and args:
        for k, v in value.items():
            yield from _nodes(args[1], v, loc + (k,))


def _leaves(tp: Any) -> list[Any]:
    tp = _unwrap(tp)
    if _is_union(tp) or get_origin(tp) is Literal:
        return [leaf for a in get_args(tp) for leaf in (_leaves(a) if not isinstance(a, (str, bool, int)) else [a])]
    return [tp]


def _admits_bool(tp: Any) -> bool:
    return any(leaf is bool or leaf is Any or isinstance(leaf, bool) for leaf in _leaves(tp))


def _kind(tp: Any) -> str:
    leaves = _leaves(tp)
    if leaves and all(isinstance(leaf, str) for leaf in leaves):
        return "one of " + ", ".join(leaves)
    if any(leaf in (int, float) for leaf in leaves):
        return "a number"
    if any(leaf is str or isinstance(leaf, str) for leaf in leaves):
        return "a string"
    if any(_is_model(leaf) or get_origin(leaf) is dict for leaf in leaves):
        return "a mapping"
    return "a list" if any(get_origin(leaf) in (tuple, list) for leaf in leaves) else "something else"


def _bool_says(value: bool, token: str | None, kind: str) -> str:
    token = token or str(value).lower()
    quote = f' (quote it, "{token}", to mean the word)' if kind == "a string" else ""
    return f"`{token}` is read by YAML as the boolean {str(value).lower()}: write {kind}{quote}"


def _bools(data: dict, src: _Source) -> list[tuple[Loc, str]]:
    """YAML 1.1 reads yes/no/on/off (and true/false) as booleans, and pydantic would take one as 1 or 0
    where a number is due: a boolean is a problem wherever its key wants no boolean."""
    out = []
    for tp, value, loc in _nodes(Settings, data):
        if isinstance(value, bool) and not _admits_bool(tp):
            at = tuple(str(p) for p in loc)
            out.append((at, _bool_says(value, src.scalars.get(at), _kind(tp))))
    return out


# -- pydantic's errors in the user's words -----------------------------------------------------------------
_KEY_PREFIX = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)*): ")
# pydantic names the union branch it tried inside an error's location (`tuple[constrained-int, ...]`,
# `literal['auto']`, `function-after[...]`, a model's class name); the user's key path has none of them
_BRANCH = re.compile(r"[\[\]()]|^(?:str|int|float|bool|none|list|dict|tuple|set|constrained-[\w-]+|[A-Z]\w*)$")
_SAYS = {
    "int_type": "write a whole number", "int_parsing": "write a whole number",
    "int_from_float": "write a whole number (no fraction)",
    "float_type": "write a number", "float_parsing": "write a number",
    "bool_type": "write true or false", "bool_parsing": "write true or false",
    "string_type": "write a string (in quotes if it would read as a number)",
    "tuple_type": "write a list, like [a, b]", "list_type": "write a list, like [a, b]",
    "dict_type": "write a mapping, like {key: value}", "model_type": "write a mapping, like {key: value}",
    "model_attributes_type": "write a mapping, like {key: value}", "none_required": "write null",
}
_KINDS = {"int_type": "a number", "int_parsing": "a number", "float_type": "a number", "float_parsing": "a number",
          "string_type": "a string", "tuple_type": "a list", "list_type": "a list", "dict_type": "a mapping",
          "model_type": "a mapping", "model_attributes_type": "a mapping"}
_LIMITS = {"greater_than": "write a number greater than {gt}", "greater_than_equal": "write a number of at least {ge}",
           "less_than": "write a number below {lt}", "less_than_equal": "write a number of at most {le}"}
_TYPE_ERRORS = frozenset(_SAYS) | {"literal_error", "enum"}
# what to write, by key name, when a value is of the wrong type
_HINTS = {
    "gpus": "write a list of GPU indexes like [0, 1], or auto",
    "command": 'write the program and its arguments as a list, like [uvicorn, app:app, --uds, "{socket}"]',
    "methods": "write a list of HTTP methods, like [GET, POST]",
    "priorities": "write a list of level names, highest first, like [critical, high, normal, low]",
    "models": "write a list of model names, like [llama-8b]",
    "enabled": "write auto, true or false",
    "routes": "write a list of routes, like [{path: /v1/embeddings, priority: high}]",
    "listen": "write a mapping like {host: 127.0.0.1, port: 8080}",
}


def _user_loc(loc: tuple, data: Any) -> tuple[Loc, int | None]:
    """pydantic's error location as the user's key path (union branch names dropped), and the length of
    the path where a branch name was dropped (None: no union on the way)."""
    out: list[str] = []
    branch_at = None
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        elif isinstance(part, str) and _BRANCH.search(part):
            if part != "[key]" and branch_at is None:
                branch_at = len(out)
            continue
        else:
            cur = None
        out.append(str(part))
    return tuple(out), branch_at


def _say(err: Any, loc: Loc, src: _Source) -> list[tuple[Loc, str]]:
    """One pydantic error as (key path, what to write instead); a validator's message may hold several."""
    kind, ctx, given = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return [(loc, "unknown key")]
    if kind == "missing":
        return [(loc, "required: write this key")]
    if kind in ("value_error", "assertion_error"):
        out = []
        for line in err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ").split("\n"):
            m = _KEY_PREFIX.match(line)  # cross-key problems carry the rest of their key path
            out.append((loc + tuple(m.group(1).split(".")), line[m.end():]) if m else (loc, line))
        return out
    if isinstance(given, bool) and kind in _KINDS:
        return [(loc, _bool_says(given, src.scalars.get(loc), _KINDS[kind]))]
    if kind in _SAYS:
        msg = _SAYS[kind]
    elif kind in _LIMITS:
        msg = _LIMITS[kind].format(**ctx)
    elif kind == "literal_error":
        msg = "write " + str(ctx.get("expected", "")).replace("True", "true").replace("False", "false")
    else:
        msg = err["msg"]
    if isinstance(given, (str, int, float)) or given is None:
        text = src.scalars.get(loc)
        shown = "null (nothing)" if given is None else repr(given) if isinstance(given, str) or not text else text
        msg += f", not {shown if len(shown) <= 40 else shown[:37] + '...'}"
    return [(loc, msg)]


def _explain(exc: ValidationError, merged: dict, src: _Source) -> list[tuple[Loc, str, bool]]:
    """Every error as (key path, message, from a section's own key); the branches of a union that all
    failed become one message ("gpus: write a list of GPU indexes like [0, 1], or auto")."""
    items = []
    for err in exc.errors():
        loc, branch_at = _user_loc(err["loc"], merged)
        for at, msg in _say(err, loc, src):
            items.append((at, branch_at, err["type"], msg, bool(err["loc"])))
    # a branch that got further into the value says more (`gpus: [-1]` is about its item, not about `auto`)
    deeper = {loc[:b] for loc, b, *_ in items if b is not None and len(loc) > b}
    items = [it for it in items if not (it[1] is not None and len(it[0]) == it[1] and it[0] in deeper)]
    by_loc: dict[Loc, list[tuple[str, str, bool]]] = {}
    for loc, _, kind, msg, own in items:
        by_loc.setdefault(loc, []).append((kind, msg, own))
    out = []
    for loc, said in by_loc.items():
        msgs = list(dict.fromkeys(msg for _, msg, _ in said))
        if {kind for kind, _, _ in said} <= _TYPE_ERRORS:  # a value of the wrong type: say what to write
            hint = _HINTS.get(loc[-1]) if loc else None
            msgs = [hint or " or ".join(msgs)]
        own = all(o for _, _, o in said)
        out.extend((loc, msg, own) for msg in msgs)
    return out


def _has(node: Any, path: Loc) -> bool:
    for part in path:
        if isinstance(node, dict):
            key = next((k for k in node if str(k) == part), _MISSING)
            if key is _MISSING:
                return False
            node = node[key]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


_MISSING = object()


def _inherited(loc: Loc, data: dict) -> bool:
    """A worker's problem with a key it took from `worker_defaults` (reported there, once)."""
    if len(loc) > 2 and loc[0] == "workers":
        own, rest = _mapping(data.get("workers")).get(loc[1]), loc[2:]
    elif len(loc) > 1 and loc[0] == "worker":
        own, rest = data.get("worker"), loc[1:]
    else:
        return False
    return not _has(own, rest) and _has(data.get("worker_defaults"), rest)


def _skipped_checks(exc: ValidationError, merged: dict) -> list[tuple[Loc, str]]:
    """The cross-key checks of every section with a failed key (pydantic skips a model's checks then)."""
    failed = [_user_loc(err["loc"], merged)[0] for err in exc.errors()]
    out = []
    for tp, value, loc in _nodes(Settings, merged):
        at = tuple(str(p) for p in loc)
        if (_is_model(tp) and issubclass(tp, _Model) and isinstance(value, dict)
                and any(len(f) > len(at) and f[:len(at)] == at for f in failed)):
            for problem in tp._problems(value):
                m = _KEY_PREFIX.match(problem)
                out.append((at + tuple(m.group(1).split(".")), problem[m.end():]) if m else (at, problem))
    return out


# -- the programs the workers run -------------------------------------------------------------------------
def find_program(program: str, path: str | None, cwd: str | None) -> str:
    """The file a worker's program runs from, as an absolute path.

    A name with a '/' is a path (a relative one from the worker's `cwd`). A bare name is looked up on
    `path` (the worker's PATH), then in the daemon's own environment's bin directory (the directory of
    our interpreter): `uvicorn` or `gunicorn` installed beside the daemon are found even where PATH lacks
    that directory, as under systemd. Raises FileNotFoundError or PermissionError naming the program and
    where it looked (`strerror`: "not found on PATH (...) nor in ...").
    """
    if "/" in program:
        full = os.path.abspath(os.path.join(cwd or os.getcwd(), program))
        if not os.path.isfile(full):
            raise FileNotFoundError(errno.ENOENT, "not found" + ("" if full == program else f" (looked for {full})"),
                                    program)
        if not os.access(full, os.X_OK):
            raise PermissionError(errno.EACCES, f"is not executable ({full})", program)
        return full
    dirs = [d for d in (os.defpath if path is None else path).split(os.pathsep) if d]
    own = os.path.dirname(sys.executable) if sys.executable else ""
    found = shutil.which(program, path=os.pathsep.join(dirs + ([own] if own else [])))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, f"not found on PATH ({os.pathsep.join(dirs)})"
                                + (f" nor in {own} (the daemon's own environment)" if own else ""), program)
    return os.path.abspath(found)


def _program_problems(merged: dict, environ: Mapping[str, str]) -> list[tuple[Loc, str]]:
    """Each worker's program and working directory, looked for as its start will (check-config)."""
    workers = merged.get("workers")
    fleet = ({("workers", str(n)): s for n, s in workers.items()} if isinstance(workers, dict) and workers
             else {("worker",): merged.get("worker")})
    out: list[tuple[Loc, str]] = []
    for at, spec in fleet.items():
        spec = _mapping(spec)
        command = spec.get("command", DEFAULT_WORKER_COMMAND)
        cwd = spec.get("cwd") if isinstance(spec.get("cwd"), str) else None
        if cwd is not None and not os.path.isdir(cwd):
            out.append((at + ("cwd",), f"no such directory: {cwd}"))
            continue
        if not (isinstance(command, (list, tuple)) and command and isinstance(command[0], str) and command[0]):
            continue  # the command's own problem
        env_path = _mapping(spec.get("env")).get("PATH")
        try:
            find_program(command[0].replace("{python}", sys.executable),
                         env_path if isinstance(env_path, str) else environ.get("PATH"), cwd)
        except OSError as exc:
            out.append((at + ("command",), f"program {exc.filename!r} {exc.strerror}"))
    return out


def parse(text: str, source: str = "<config>", *, check_programs: bool = False) -> Settings:
    """Parse and validate YAML text. Raises ConfigError listing every problem, each with its key path and
    line: wrong values, keys written twice, booleans where a number or string is due, cross-key problems
    of every section; with `check_programs` (check-config) also each worker's program that is not found."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"invalid YAML{where}: {problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"the top level must be a mapping, not {type(data).__name__}"])
    src = _read_source(text)
    merged = _with_defaults(data)
    bools = _bools(data, src)
    found = list(src.duplicates) + bools
    settings = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        said = {loc for loc, _ in bools}
        found += [(loc, msg) for loc, msg, own in _explain(exc, merged, src)
                  if loc not in said and not (own and _inherited(loc, data))]
        found += _skipped_checks(exc, merged)
    if check_programs:
        found += _program_problems(merged, os.environ)
    if found:
        problems = []  # in the file's order
        for loc, msg in found:
            line = _line_for(src.lines, loc)
            at = f" (line {line})" if line else ""
            problems.append((line or math.inf, f"{'.'.join(loc) or '(top level)'}{at}: {msg}"))
        raise ConfigError(source, list(dict.fromkeys(p for _, p in sorted(problems, key=lambda p: p[0]))))
    return settings


def load(path: str | os.PathLike[str], *, check_programs: bool = False) -> LoadedConfig:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read file: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(p), ["file is not UTF-8 text"]) from None
    settings = parse(text, str(p), check_programs=check_programs)
    return LoadedConfig(settings=settings, source=str(p), digest=hashlib.sha256(raw).hexdigest()[:12])


def dump(settings: Settings) -> str:
    """The effective config as YAML (what check-config prints)."""
    data = settings.model_dump(mode="json", exclude_none=False)
    for k in ("worker", "worker_defaults", "workers"):
        if not data.get(k):
            data.pop(k, None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def retry_after_seconds(x: float) -> int:
    """Whole seconds, >= 1, as Retry-After needs."""
    return max(1, math.ceil(x)) if math.isfinite(x) else 60
