"""Proxy buffering for one worker answer: memory up to a limit, then an unlinked temporary file.

nginx-style: the worker's answer is read into a `ResponseSpool` as fast as the worker sends it, so a
finished answer frees the worker's slot however slowly the client reads; the client is served from the
spool, while it fills or after. One producer calls `append()` then `finish()`; one consumer iterates
`chunks()`; `close()` frees everything. Bytes read back are dropped, so the limits bound what is unread.
File I/O runs in the default executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

READ_SIZE = 1 << 16  # bytes per read from the spool file


class SpoolError(Exception):
    """The spool cannot take or give back bytes (closed, cancelled mid-write, file error)."""


class SpoolFull(SpoolError):
    """An append would put more than disk_limit_bytes in the spool file (or spilling is off)."""


class ResponseSpool:
    """Keeps an answer's bytes in order: in memory up to memory_limit_bytes, past that in a file.

    disk_dir=None or disk_limit_bytes=0 turns spilling off: an append that does not fit in memory raises
    SpoolFull. The file is created on the first spill, unlinked from the start (nothing is left behind
    by a crash) and its space reused once everything written to it has been read back.
    """

    def __init__(self, memory_limit_bytes: int, disk_dir: str | os.PathLike[str] | None,
                 disk_limit_bytes: int, read_size: int = READ_SIZE):
        if memory_limit_bytes < 0 or disk_limit_bytes < 0:
            raise ValueError(f"spool limits must be >= 0, got memory={memory_limit_bytes} disk={disk_limit_bytes}")
        if read_size < 1:
            raise ValueError(f"read_size must be >= 1, got {read_size}")
        self.memory_limit = memory_limit_bytes
        self.disk_dir = None if disk_dir is None else os.fspath(disk_dir)
        self.disk_limit = disk_limit_bytes if disk_dir is not None else 0
        self.read_size = read_size
        self._mem: deque[bytes] = deque()
        self._mem_bytes = 0
        self._file: Any = None  # the unlinked temporary file, once spilled
        self._wr = 0  # file offsets: written up to, read up to
        self._rd = 0
        self._io_busy = 0  # executor jobs on the file still running (close waits for them)
        self._appending = False
        self._reading = False
        self._waiter: asyncio.Future[None] | None = None  # the reader, waiting for bytes
        self._drained: asyncio.Future[None] | None = None  # the writer, waiting for the reader
        self.total_bytes = 0  # everything ever appended
        self.spilled = False
        self.finished = False
        self.closed = False
        self._broken: str | None = None

    # -- the producer --------------------------------------------------------------------------
    async def append(self, chunk: bytes) -> None:
        """Add bytes after everything appended before; may write to the file (in a thread)."""
        self._check_open()
        if self.finished:
            raise SpoolError("append after finish()")
        if self._appending:
            raise SpoolError("one append at a time: await the previous one")
        if not chunk:
            return
        n = len(chunk)
        # memory only while nothing unread waits in the file, so memory always holds the older bytes
        if self._rd == self._wr and self._mem_bytes + n <= self.memory_limit:
            self._mem.append(chunk)
            self._mem_bytes += n
            self.total_bytes += n
            self._wake()
            return
        if self._rd == self._wr:
            self._rd = self._wr = 0  # nothing unread in the file (and no job on it): reuse it from the start
        if self._wr + n > self.disk_limit:
            raise SpoolFull(self._full_message(n))
        self._appending = True
        try:
            if self._file is None:
                await self._io(self._open_file)
                self._check_open()
                self.spilled = True
            off = self._wr
            await self._io(_pwrite_all, self._file.fileno(), chunk, off)
            self._wr = off + n
            self.total_bytes += n
        except asyncio.CancelledError:
            self._broken = "an append was cancelled mid-write"
            raise
        except OSError as exc:
            self._broken = f"spool file write failed: {exc}"
            raise SpoolError(self._broken) from exc
        finally:
            self._appending = False
        self._wake()

    def finish(self) -> None:
        """No more appends: `chunks()` ends after the last byte."""
        self.finished = True
        self._wake()

    async def wait_drained(self) -> None:
        """Wait until the reader has taken every byte appended so far (e.g. after SpoolFull, to retry).

        A chunk larger than both limits never fits, drained or not: SpoolFull says so; split it.
        """
        while True:
            self._check_open()
            if self._mem_bytes == 0 and self._rd == self._wr:
                return
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    # -- the consumer --------------------------------------------------------------------------
    async def chunks(self) -> AsyncIterator[bytes]:
        """Every byte appended, in order, as it becomes available; ends after `finish()`."""
        if self._reading:
            raise SpoolError("one reader at a time")
        self._reading = True
        loop = asyncio.get_running_loop()  # (once: on Python 3.11 each call is a getpid() system call)
        try:
            while True:
                self._check_open()
                if self._mem:
                    chunk = self._mem.popleft()
                    self._mem_bytes -= len(chunk)
                    self._wake_writer()
                    yield chunk
                elif self._rd < self._wr:
                    yield await self._read_file()
                elif self.finished:
                    return
                else:
                    self._waiter = loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        finally:
            self._reading = False

    async def _read_file(self) -> bytes:
        off = self._rd
        n = min(self.read_size, self._wr - off)
        try:
            data = await self._io(os.pread, self._file.fileno(), n, off)
        except OSError as exc:
            self._broken = f"spool file read failed: {exc}"
            raise SpoolError(self._broken) from exc
        if len(data) != n:
            self._broken = f"spool file gave {len(data)} bytes at offset {off}, expected {n}"
            raise SpoolError(self._broken)
        self._rd = off + n
        if self._rd == self._wr and not self._appending:
            self._rd = self._wr = 0  # all read back: reuse the file's space from the start
        self._wake_writer()
        return data

    # -- state ---------------------------------------------------------------------------------
    @property
    def memory_bytes(self) -> int:
        """Unread bytes held in memory."""
        return self._mem_bytes

    @property
    def disk_bytes(self) -> int:
        """Unread bytes held in the file."""
        return self._wr - self._rd

    @property
    def pending_bytes(self) -> int:
        return self._mem_bytes + self._wr - self._rd

    def close(self) -> None:
        """Free the memory and the file (after any file job still running); idempotent."""
        if self.closed:
            return
        self.closed = True
        self._mem.clear()
        self._mem_bytes = 0
        self._wake()
        self._wake_writer()
        if self._io_busy == 0:
            self._close_file()

    # -- helpers -------------------------------------------------------------------------------
    def _full_message(self, n: int) -> str:
        never = " (a chunk this large can never fit: split it)" if n > max(self.memory_limit, self.disk_limit) else ""
        if self.disk_limit:
            return (f"spool full: {n} more bytes would exceed disk_limit_bytes={self.disk_limit} (memory "
                    f"{self._mem_bytes}/{self.memory_limit}, file {self._wr - self._rd} unread){never}")
        return (f"spool full: {n} more bytes exceed memory_limit_bytes={self.memory_limit} and spilling to disk "
                f"is off{never}")

    def _check_open(self) -> None:
        if self.closed:
            raise SpoolError("the spool is closed")
        if self._broken is not None:
            raise SpoolError(self._broken)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_writer(self) -> None:
        w = self._drained
        if w is not None and not w.done():
            w.set_result(None)

    def _open_file(self) -> None:
        """Runs in the executor; sets the file itself, so a cancelled append cannot lose it."""
        try:
            self._file = tempfile.TemporaryFile(dir=self.disk_dir, prefix="gs-spool-", buffering=0)
        except OSError as exc:
            raise SpoolError(f"cannot create a spool file in {self.disk_dir!r}: {exc.strerror or exc}") from exc

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a file job in the executor; the file stays open until it ends, even if we are cancelled."""
        fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._io_busy += 1
        fut.add_done_callback(self._io_done)
        return await asyncio.shield(fut)

    def _io_done(self, fut: asyncio.Future[Any]) -> None:
        self._io_busy -= 1
        if not fut.cancelled():
            fut.exception()  # retrieved here so a job nobody awaits any more is not logged as lost
        if self.closed and self._io_busy == 0:
            self._close_file()

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]
