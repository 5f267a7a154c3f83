"""The usage log in one SQLite file (`clients.store: sqlite:///PATH`), used from one dedicated thread."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from .usage import Batch, UsageRow, UsageUnavailable

log = structlog.get_logger("supervisor.budgets.usage_sqlite")

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL,
    minute INTEGER NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    PRIMARY KEY (key, minute, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_minute ON usage (minute);
CREATE TABLE IF NOT EXISTS usage_batches (
    id TEXT PRIMARY KEY,
    minute INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_batches_minute ON usage_batches (minute);
"""
ADD = ("INSERT INTO usage (key, minute, model, requests, input_tokens, output_tokens) VALUES (?, ?, ?, ?, ?, ?) "
       "ON CONFLICT (key, minute, model) DO UPDATE SET requests = requests + excluded.requests, "
       "input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens")


class SqliteUsageStore:
    """Every call runs in one thread that owns the connection; the event loop only awaits it. A batch's
    id is stored in the transaction that adds its rows, so a batch is applied once."""

    kind = "sqlite"

    def __init__(self, path: str, busy_timeout_s: float = 5.0):
        self.path = path
        self.busy_timeout_s = busy_timeout_s     # how long a write waits for another writer of the file
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-sqlite")
        self._db: sqlite3.Connection | None = None

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)
        except sqlite3.Error as exc:
            raise UsageUnavailable(f"usage store {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("not open")
        return self._db

    async def open(self) -> None:
        try:
            await self._call(self._open)
        except OSError as exc:
            raise UsageUnavailable(f"usage store {self.path}: cannot create its directory ({exc})") from exc

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=self.busy_timeout_s)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")   # usage may lose its last flush on a power cut, not more
            db.executescript(SCHEMA)
        except sqlite3.Error:
            db.close()
            raise
        self._db = db
        log.info("usage_store_opened", store="sqlite", path=self.path)

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        await asyncio.get_running_loop().run_in_executor(self._exec, _close)
        self._exec.shutdown(wait=True)

    async def apply(self, batch: Batch, retention_s: float, now: float) -> None:
        await self._call(self._apply, batch, int(now // 60) * 60)

    def _apply(self, batch: Batch, minute: int) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            done = db.execute("INSERT OR IGNORE INTO usage_batches (id, minute) VALUES (?, ?)",
                              (batch.id, minute)).rowcount == 0
            if not done:
                db.executemany(ADD, [(r.key, r.minute, r.model, r.requests, r.input_tokens, r.output_tokens)
                                     for r in batch.rows])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    async def rows(self, key: str, since_minute: int) -> list[UsageRow]:
        return await self._call(self._rows, key, since_minute)

    def _rows(self, key: str, since_minute: int) -> list[UsageRow]:
        cur = self._conn().execute(
            "SELECT key, model, minute, requests, input_tokens, output_tokens FROM usage "
            "WHERE key = ? AND minute >= ? ORDER BY minute, model", (key, since_minute))
        return [UsageRow(*r) for r in cur]

    async def prune(self, before_minute: int) -> int:
        return await self._call(self._prune, before_minute)

    def _prune(self, before_minute: int) -> int:
        db = self._conn()
        gone = db.execute("DELETE FROM usage WHERE minute < ?", (before_minute,)).rowcount
        db.execute("DELETE FROM usage_batches WHERE minute < ?", (before_minute,))
        return gone
