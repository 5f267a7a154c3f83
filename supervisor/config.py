"""The validated, immutable policy: YAML in, one frozen `Settings` object out, problems with key paths."""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

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
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


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

    @model_validator(mode="after")
    def _order(self) -> Restart:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self


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
    """How long a fresh replica stays before it may be evicted."""
    max_starvation_s: PosFloat = 30.0
    """How long a replica may wait for room on its GPU before busy replicas there are drained for it."""

    @model_validator(mode="after")
    def _placement(self) -> WorkerSpec:
        if self.gpus is not None and self.replicas is not None:
            raise ValueError("replicas: cannot be set together with gpus (gpus gives one replica per GPU)")
        if isinstance(self.gpus, tuple):
            if not self.gpus:
                raise ValueError("gpus: list at least one GPU index, or use `auto`")
            if len(set(self.gpus)) != len(self.gpus):
                raise ValueError("gpus: each GPU may be listed once (one replica per GPU)")
        for m in self.models:
            if not m:
                raise ValueError("models: a model name cannot be empty")
        return self

    def lifecycle(self) -> WorkerSpec:
        """The keys a running process depends on: a change here restarts replicas; the rest (placement,
        models, slots, on-demand policy) the fleet applies without a restart."""
        return self.model_copy(update={"gpus": None, "replicas": None, "models": (), "concurrency": None,
                                       "start": "eager", "idle_unload_s": 0.0, "pinned": False,
                                       "min_resident_s": 0.0, "max_starvation_s": 1.0, "gpu_memory_mb": 0})

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


_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


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

    @model_validator(mode="after")
    def _needs_key(self) -> Fairness:
        if self.key is None and (self.weights or self.max_queued_per_key):
            raise ValueError("weights and max_queued_per_key need a key ('header:<Name>' or 'ip')")
        return self


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

    @model_validator(mode="after")
    def _names(self) -> Queue:
        if not self.priorities:
            raise ValueError("priorities: at least one level is needed")
        if len(set(self.priorities)) != len(self.priorities):
            raise ValueError("priorities: names must be unique")
        for name in self.priorities:
            if not name or name.isdigit():
                raise ValueError(f"priorities: {name!r} is not a valid level name (digits mean an index)")
        if self.default_priority not in self.priorities:
            raise ValueError(f"default_priority: {self.default_priority!r} is not one of {list(self.priorities)}")
        for name in self.levels:
            if name not in self.priorities:
                raise ValueError(f"levels.{name}: not one of priorities {list(self.priorities)}")
        if "default" in self.pools:
            raise ValueError("pools.default: the default pool is sized by queue.concurrency")
        return self

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

    @model_validator(mode="after")
    def _order(self) -> Breaker:
        if self.open_max_s < self.open_s:
            raise ValueError("open_max_s must be >= open_s")
        if self.min_calls > self.window:
            raise ValueError("min_calls must be <= window")
        return self


class Thresholds(_Model):
    soft: Ratio = 0.85
    """used/total at which pressure is soft."""
    hard: Ratio = 0.93
    """used/total at which pressure is hard."""
    critical: Ratio = 0.97
    """used/total at which pressure is critical."""

    @model_validator(mode="after")
    def _order(self) -> Thresholds:
        if not self.soft < self.hard < self.critical:
            raise ValueError("thresholds must rise: soft < hard < critical")
        return self


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
    """Idle keep-alive client connections are closed after this."""
    max_header_bytes: PosInt = 8190
    """Request line / header field size; larger: 400."""
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

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data: Any) -> Any:
        """`worker_defaults` keys flow into every worker (a worker's own keys win)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        if "worker" not in out and not out.get("workers"):
            out["worker"] = {}  # the single-worker form, with every default
        defaults = data.get("worker_defaults")
        if not isinstance(defaults, dict) or not defaults:
            return out
        if isinstance(data.get("workers"), dict):
            out["workers"] = {name: _deep_merge(defaults, spec) if isinstance(spec, dict) else spec
                              for name, spec in data["workers"].items()}
        if isinstance(data.get("worker"), dict):
            out["worker"] = _deep_merge(defaults, data["worker"])
        return out

    @property
    def fleet(self) -> dict[str, WorkerSpec]:
        """Every worker by name, in config order: `workers`, or the single `worker` named `default`."""
        if self.workers:
            return self.workers
        return {"default": self.worker or self.worker_defaults or WorkerSpec()}

    @property
    def first_worker(self) -> WorkerSpec:
        return next(iter(self.fleet.values()))

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        prios = self.queue.priorities
        pools = self.queue.pool_sizes()
        if self.worker is not None and self.workers:
            raise ValueError("worker: use either `worker` (one worker) or `workers` (a fleet), not both")
        owner: dict[str, str] = {}
        for name, spec in self.workers.items():
            if not WORKER_NAME_RE.match(name):
                raise ValueError(f"workers.{name}: a worker name is 1-32 letters, digits, '_', '.', '-' "
                                 "(it names sockets, log fields and metric labels)")
            for m in spec.models:
                if m in owner:
                    raise ValueError(f"workers.{name}.models: model {m!r} is already served by worker "
                                     f"{owner[m]!r}; a model name belongs to one worker")
                owner[m] = name
        fleet = self.fleet
        from .gpu_ledger import WorkerNeed, check_static_fit  # pure, no cycle: it imports nothing of ours
        needs = [WorkerNeed(f"workers.{n}" if self.workers else "worker", w.gpu_memory_mb,
                            tuple(g for g in w.placements() if g is not None), w.pinned) for n, w in fleet.items()]
        problems = check_static_fit(needs, self.gpu.budget_mb, self.gpu.reserve_mb)
        if problems:
            raise ValueError(problems[0])
        for i, r in enumerate(self.routes):
            if r.worker is not None and r.worker not in fleet:
                raise ValueError(f"routes.{i}.worker: {r.worker!r} is not one of the workers {list(fleet)}")
            if r.priority is not None and r.priority not in prios:
                raise ValueError(f"routes.{i}.priority: {r.priority!r} is not one of {list(prios)}")
            if r.pool not in pools:
                raise ValueError(f"routes.{i}.pool: {r.pool!r} is not one of {sorted(pools)}")
        for lvl in ("soft", "hard", "critical"):
            shed = getattr(self.gpu.actions, lvl).shed_below
            if shed is not None and shed not in prios:
                raise ValueError(f"gpu.actions.{lvl}.shed_below: {shed!r} is not one of {list(prios)}")
        if self.admin.listen is not None and self.admin.listen == self.listen and self.listen.port != 0:
            raise ValueError("admin.listen: must differ from listen")
        return self

    def route_for(self, method: str, path: str, model: str | None = None) -> Route | None:
        """The first route whose path prefix, methods and (if it names one) model match."""
        for r in self.routes:
            if (path.startswith(r.path) and (r.methods is None or method in r.methods)
                    and (r.model is None or r.model == model)):
                return r
        return None

    @property
    def routes_by_model(self) -> bool:
        """Whether routing needs the JSON body's `model` (a route names one, or a worker serves models)."""
        return any(r.model is not None for r in self.routes) or any(w.models for w in self.fleet.values())


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


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each mapping key path (and sequence index) in the YAML text to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (str(i),)
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    if root is not None:
        walk(root, ())
    return lines


def _line_for(lines: dict[tuple[str, ...], int], loc: tuple[str, ...]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


_KEY_PREFIX = re.compile(r"^([A-Za-z_][\w]*(?:\.[\w]+)*): ")


def parse(text: str, source: str = "<config>") -> Settings:
    """Parse and validate YAML text. Raises ConfigError listing every problem."""
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
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = _key_lines(text)
        problems = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            # Cross-field problems carry the rest of their key path at the start of the message.
            m = _KEY_PREFIX.match(msg)
            if m and err["type"] == "value_error":
                loc = loc + tuple(m.group(1).split("."))
                msg = msg[m.end():]
            key = ".".join(loc) if loc else "(top level)"
            line = _line_for(lines, loc)
            at = f" (line {line})" if line else ""
            problems.append(f"{key}{at}: {msg}")
        raise ConfigError(source, problems) from None


def load(path: str | os.PathLike[str]) -> LoadedConfig:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read file: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(p), ["file is not UTF-8 text"]) from None
    settings = parse(text, str(p))
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
