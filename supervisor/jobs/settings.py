"""The `jobs:` policy (validated, frozen) and where the job store lives; imports nothing but pydantic.

Store URLs: `sqlite:///ABSOLUTE/PATH`, `redis://[user:pass@]HOST[:PORT][/DB]`, `rediss://...` (TLS),
`unix:///PATH/TO/redis.sock[?db=N]`; `null` means SQLite at `{state_dir}/jobs.db`.
State dir: the config's `state_dir`, else `$STATE_DIRECTORY` (the first of a ':' list, as systemd's
`StateDirectory=` sets it), else `~/.local/state/gpu-supervisor`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

PosFloat = Annotated[float, Field(gt=0)]
PosInt = Annotated[int, Field(gt=0)]

DEFAULT_STATE_DIR = "~/.local/state/gpu-supervisor"
DB_NAME = "jobs.db"
REGEX_PREFIX = "re:"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class StoreSpec:
    """Where the job store is: `kind` sqlite (a file `path`) or redis (a client `url`)."""

    kind: Literal["sqlite", "redis"]
    path: str | None = None
    url: str | None = None


def parse_store_url(url: str) -> StoreSpec:
    """A store URL checked and split; ValueError naming what is wrong and what is accepted."""
    accepted = "accepted: sqlite:///PATH, redis://HOST:PORT/DB, rediss://HOST:PORT/DB, unix:///PATH?db=N"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        path = url[len("sqlite://"):]
        if parts.netloc or not path.startswith("/") or len(path) < 2:
            raise ValueError(f"{url!r}: a SQLite store is sqlite:///ABSOLUTE/PATH (three slashes)")
        if parts.query:
            raise ValueError(f"{url!r}: a SQLite store URL takes no query")
        return StoreSpec("sqlite", path=path)
    if scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError(f"{url!r}: a Redis URL needs a host, e.g. redis://127.0.0.1:6379/0")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{url!r}: bad port ({exc})") from None
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"{url!r}: the database after the host must be a number, e.g. /0")
        return StoreSpec("redis", url=url)
    if scheme == "unix":
        if not parts.path.startswith("/"):
            raise ValueError(f"{url!r}: a Unix socket URL is unix:///ABSOLUTE/PATH[?db=N]")
        q = parse_qs(parts.query)
        bad = sorted(set(q) - {"db", "password", "username"})
        if bad:
            raise ValueError(f"{url!r}: unknown query key(s) {bad}; allowed: db, username, password")
        if "db" in q and not (len(q["db"]) == 1 and q["db"][0].isdigit()):
            raise ValueError(f"{url!r}: db must be one number")
        return StoreSpec("redis", url=url)
    raise ValueError(f"{url!r}: unknown store scheme {parts.scheme!r}; {accepted}")


def resolve_state_dir(configured: str | None, env: Mapping[str, str]) -> str:
    """The state directory: config `state_dir`, else $STATE_DIRECTORY (first of a ':' list), else
    ~/.local/state/gpu-supervisor; `~` expanded."""
    if configured:
        return os.path.expanduser(configured)
    first = (env.get("STATE_DIRECTORY") or "").split(":")[0]
    if first:
        return first
    return os.path.expanduser(DEFAULT_STATE_DIR)


def store_spec(store: str | None, state_dir: str) -> StoreSpec:
    """The store to open: the configured URL, else SQLite at `{state_dir}/jobs.db`."""
    if store is None:
        return StoreSpec("sqlite", path=os.path.join(state_dir, DB_NAME))
    return parse_store_url(store)


def callback_allowed(url: str, allow: tuple[str, ...]) -> bool:
    """Whether a callback may go to `url`: it starts with an allowed prefix, or fully matches an
    allowed `re:` pattern. An empty list allows nothing."""
    for rule in allow:
        if rule.startswith(REGEX_PREFIX):
            if re.fullmatch(rule[len(REGEX_PREFIX):], url):
                return True
        elif url.startswith(rule) and (urlsplit(rule).path or url[len(rule):len(rule) + 1] in ("", "/", "?", "#")):
            return True     # a bare-host prefix must not match a longer host name (example.com.evil)
    return False


class Callbacks(_Model):
    # Each entry: a URL prefix ("https://hooks.example.com/") or "re:<regex>" matched against the whole URL.
    allow: tuple[str, ...] = ()
    max_attempts: PosInt = 5
    backoff_initial_s: PosFloat = 1.0
    backoff_max_s: PosFloat = 60.0
    timeout_s: PosFloat = 10.0
    max_pending: PosInt = 1000              # callbacks waiting to be sent; past it, new ones are dropped (logged)

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for rule in v:
            if rule.startswith(REGEX_PREFIX):
                try:
                    re.compile(rule[len(REGEX_PREFIX):])
                except re.error as exc:
                    raise ValueError(f"{rule!r}: not a valid regular expression ({exc})") from None
            else:
                parts = urlsplit(rule)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise ValueError(f"{rule!r}: a prefix must be an http(s) URL with a host, "
                                     "e.g. https://hooks.example.com/ (or 're:<regex>')")
        return v


class JobsSettings(_Model):
    store: str | None = None               # None: SQLite at {state_dir}/jobs.db
    result_ttl_s: PosFloat = 1800.0        # how long a finished job's answer is kept
    max_pending: PosInt = 10000            # queued + running; past it, new async submissions get 429
    max_result_bytes: PosInt = 16 * 1024 * 1024
    lease_s: PosFloat = 30.0               # Redis: a job not renewed this long is claimed again
    max_attempts: PosInt = 3               # deliveries before a job fails `dead_letter`
    cleanup_interval_s: PosFloat = 60.0    # expire results and delete old records this often
    poll_interval_s: PosFloat = 1.0        # look for jobs submitted elsewhere (Redis) this often at most
    callbacks: Callbacks = Callbacks()

    @field_validator("store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is not None:
            parse_store_url(v)
        return v
