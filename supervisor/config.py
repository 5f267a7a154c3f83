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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080


class Health(_Model):
    path: str = "/healthz"
    interval_s: PosFloat = 2.0
    timeout_s: PosFloat = 2.0
    failures: PosInt = 3

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v


class Restart(_Model):
    backoff_initial_s: NonNegFloat = 0.5
    backoff_max_s: NonNegFloat = 30.0
    max_restarts: NonNegInt = 10
    window_s: PosFloat = 300.0

    @model_validator(mode="after")
    def _order(self) -> Restart:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self


class Recycle(_Model):
    max_requests: NonNegInt = 0
    max_requests_jitter: NonNegInt = 0
    max_rss_mb: NonNegInt = 0
    max_gpu_memory_mb: NonNegInt = 0


class Worker(_Model):
    command: tuple[str, ...] = DEFAULT_WORKER_COMMAND
    env: dict[str, str] = {}
    cwd: str | None = None
    startup_timeout_s: PosFloat = 300.0
    hang_timeout_s: PosFloat = 300.0
    stop_grace_s: NonNegFloat = 10.0
    health: Health = Health()
    restart: Restart = Restart()
    recycle: Recycle = Recycle()

    @field_validator("command")
    @classmethod
    def _command(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or not v[0]:
            raise ValueError("must name a program to run")
        return v


class Level(_Model):
    timeout_s: PosFloat | None = None
    max_size: PosInt | None = None


class Pool(_Model):
    concurrency: PosInt = 1


class Queue(_Model):
    concurrency: PosInt = 1
    max_size: PosInt = 1000
    priorities: tuple[str, ...] = ("critical", "high", "normal", "low")
    default_priority: str = "normal"
    priority_header: str = "X-Priority"
    timeout_header: str = "X-Request-Timeout"
    levels: dict[str, Level] = {}
    timeout_s: PosFloat = 60.0
    pools: dict[str, Pool] = {}

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
    path: str
    methods: tuple[str, ...] | None = None
    priority: str | None = None
    pool: str = "default"
    timeout_s: PosFloat | None = None
    retry: bool | None = None
    gpu_memory_mb: NonNegInt = 0

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

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
    methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
    max_body_bytes: NonNegInt = 1_048_576

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
    min_calls: PosInt = 5
    failure_rate: Ratio = 0.5
    slow_call_s: PosFloat | None = None
    slow_call_rate: Ratio = 1.0
    open_s: PosFloat = 5.0
    open_max_s: PosFloat = 60.0
    half_open_probes: PosInt = 1

    @model_validator(mode="after")
    def _order(self) -> Breaker:
        if self.open_max_s < self.open_s:
            raise ValueError("open_max_s must be >= open_s")
        if self.min_calls > self.window:
            raise ValueError("min_calls must be <= window")
        return self


class Thresholds(_Model):
    soft: Ratio = 0.85
    hard: Ratio = 0.93
    critical: Ratio = 0.97

    @model_validator(mode="after")
    def _order(self) -> Thresholds:
        if not self.soft < self.hard < self.critical:
            raise ValueError("thresholds must rise: soft < hard < critical")
        return self


class SoftAction(_Model):
    shed_below: str | None = "high"
    concurrency: PosInt | None = None


class HardAction(_Model):
    pause: bool = True
    cleanup: bool = True
    shed_below: str | None = None


class CriticalAction(_Model):
    restart_after_s: NonNegFloat | None = 10.0
    shed_below: str | None = None


class Actions(_Model):
    soft: SoftAction = SoftAction()
    hard: HardAction = HardAction()
    critical: CriticalAction = CriticalAction()


class Gpu(_Model):
    enabled: Literal["auto", True, False] = "auto"
    poll_interval_s: PosFloat = 1.0
    thresholds: Thresholds = Thresholds()
    hysteresis: Annotated[float, Field(ge=0, lt=0.5)] = 0.02
    actions: Actions = Actions()


class Host(_Model):
    thresholds: Thresholds = Thresholds(soft=0.90, hard=0.95, critical=0.98)


class Fallback(_Model):
    cpu_after_oom_restarts: NonNegInt = 0
    env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": ""}


class Limits(_Model):
    max_body_bytes: PosInt = 16 * 1024 * 1024
    client_timeout_s: PosFloat = 60.0
    max_header_bytes: PosInt = 8190


class Drain(_Model):
    timeout_s: NonNegFloat = 30.0


class Admin(_Model):
    listen: Listen | None = None
    token_file: str | None = None


class Logging(_Model):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = False


class Settings(_Model):
    listen: Listen = Listen()
    runtime_dir: str | None = None
    worker: Worker = Worker()
    queue: Queue = Queue()
    routes: tuple[Route, ...] = ()
    retry: Retry = Retry()
    breaker: Breaker = Breaker()
    gpu: Gpu = Gpu()
    host: Host = Host()
    fallback: Fallback = Fallback()
    limits: Limits = Limits()
    drain: Drain = Drain()
    admin: Admin = Admin()
    logging: Logging = Logging()

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        prios = self.queue.priorities
        pools = self.queue.pool_sizes()
        for i, r in enumerate(self.routes):
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

    def route_for(self, method: str, path: str) -> Route | None:
        for r in self.routes:
            if path.startswith(r.path) and (r.methods is None or method in r.methods):
                return r
        return None


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
    data = settings.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def retry_after_seconds(x: float) -> int:
    """Whole seconds, >= 1, as Retry-After needs."""
    return max(1, math.ceil(x)) if math.isfinite(x) else 60
