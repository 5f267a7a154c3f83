"""ResponseSpool: memory up to its limit, then an unlinked file; order kept; limits refused; nothing leaked."""

from __future__ import annotations

import asyncio
import os
import random
import threading

import pytest

from supervisor.response_spool import ResponseSpool, SpoolError, SpoolFull
from tests.harness import wait_until


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fds_into(directory) -> list[str]:
    """Open descriptors of this process whose file lives in `directory` (an unlinked one included)."""
    d = os.fspath(directory)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(d + "/"):
            found.append(target)
    return found


async def read_all(spool: ResponseSpool) -> bytes:
    return b"".join([c async for c in spool.chunks()])


def pieces(seed: int, count: int, largest: int) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        n = rnd.randint(1, largest)
        out.append(bytes([i % 251]) * n)
    return out


async def test_memory_only(tmp_path):
    spool = ResponseSpool(1000, tmp_path, 10_000)
    for part in (b"a" * 100, b"b" * 200, b"c" * 300):
        await spool.append(part)
    assert not spool.spilled and spool.memory_bytes == 600 and spool.disk_bytes == 0
    assert fds_into(tmp_path) == [] and os.listdir(tmp_path) == []
    spool.finish()
    assert await read_all(spool) == b"a" * 100 + b"b" * 200 + b"c" * 300
    assert spool.pending_bytes == 0 and spool.total_bytes == 600
    spool.close()


async def test_spills_to_an_unlinked_file_in_disk_dir(tmp_path):
    spool = ResponseSpool(100, tmp_path, 10_000)
    await spool.append(b"1" * 60)
    await spool.append(b"2" * 60)  # past the memory limit: to the file
    await spool.append(b"3" * 500)
    assert spool.spilled and spool.memory_bytes == 60 and spool.disk_bytes == 560
    held = fds_into(tmp_path)
    assert len(held) == 1 and held[0].endswith("(deleted)"), held
    assert os.listdir(tmp_path) == []  # unlinked: a crash leaves nothing behind
    spool.finish()
    assert await read_all(spool) == b"1" * 60 + b"2" * 60 + b"3" * 500
    spool.close()
    assert fds_into(tmp_path) == []


async def test_order_is_kept_across_the_memory_disk_boundary(tmp_path):
    parts = pieces(seed=7, count=300, largest=5000)
    spool = ResponseSpool(20_000, tmp_path, 10_000_000, read_size=1777)
    for p in parts:
        await spool.append(p)
    assert spool.spilled and spool.memory_bytes > 0 and spool.disk_bytes > 0
    spool.finish()
    assert await read_all(spool) == b"".join(parts)
    spool.close()


async def test_reader_follows_a_concurrent_writer_in_order(tmp_path):
    """Producer and consumer at once; the consumer sometimes catches up, so appends go back to memory."""
    parts = pieces(seed=11, count=400, largest=3000)
    spool = ResponseSpool(8_000, tmp_path, 10_000_000, read_size=1000)
    got: list[bytes] = []
    where = {"memory_after_spill": False}

    async def produce() -> None:
        for i, p in enumerate(parts):
            was_spilled = spool.spilled
            before = spool.memory_bytes
            await spool.append(p)
            if was_spilled and spool.memory_bytes > before:
                where["memory_after_spill"] = True
            if i % 50 == 49:  # now and then the reader catches up with everything
                await wait_until(lambda: spool.pending_bytes == 0, what="the reader to catch up", interval=0.001)
        spool.finish()

    async def consume() -> None:
        async for c in spool.chunks():
            got.append(c)

    async with asyncio.timeout(60):
        await asyncio.gather(produce(), consume())
    assert b"".join(got) == b"".join(parts)
    assert spool.spilled and where["memory_after_spill"]
    spool.close()


async def test_disk_limit_is_refused_with_a_clear_error(tmp_path):
    spool = ResponseSpool(10, tmp_path, 100)
    await spool.append(b"m" * 10)
    await spool.append(b"d" * 60)
    with pytest.raises(SpoolFull, match="disk_limit_bytes=100"):
        await spool.append(b"x" * 50)
    assert spool.disk_bytes == 60  # the refused chunk left no trace
    # once everything is read back the file's space is free again
    got = []
    async for c in spool.chunks():
        got.append(c)
        if sum(map(len, got)) == 70:
            break
    assert b"".join(got) == b"m" * 10 + b"d" * 60
    await spool.append(b"y" * 95)
    spool.finish()
    assert await read_all(spool) == b"y" * 95
    spool.close()


async def test_without_a_disk_dir_memory_is_the_limit():
    spool = ResponseSpool(100, None, 1_000_000)
    await spool.append(b"a" * 100)
    with pytest.raises(SpoolFull, match="spilling to disk is off"):
        await spool.append(b"b")
    with pytest.raises(SpoolFull, match="can never fit"):
        await spool.append(b"c" * 101)
    spool.finish()
    assert await read_all(spool) == b"a" * 100
    spool.close()


async def test_close_removes_the_file_and_leaks_no_fd(tmp_path):
    before = open_fds()
    spool = ResponseSpool(10, tmp_path, 1_000_000, read_size=1000)
    for i in range(20):
        await spool.append(bytes([65 + i]) * 1000)
    assert spool.spilled and len(fds_into(tmp_path)) == 1
    it = spool.chunks()
    assert await anext(it) == b"A" * 1000
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        await anext(it)
    assert fds_into(tmp_path) == [] and open_fds() == before
    with pytest.raises(SpoolError, match="closed"):
        await spool.append(b"more")
    spool.close()  # idempotent


class GatedPwrite:
    """os.pwrite that holds each write in its thread until released, so a test can act mid-write."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.real = os.pwrite

    def __call__(self, fd, data, offset):
        self.entered.set()
        assert self.release.wait(30), "the test never released the write"
        return self.real(fd, data, offset)


async def test_close_during_a_write_frees_the_file_when_the_write_ends(tmp_path, monkeypatch):
    before = open_fds()
    spool = ResponseSpool(0, tmp_path, 1 << 20)
    await spool.append(b"x")
    gate = GatedPwrite()
    monkeypatch.setattr(os, "pwrite", gate)
    task = asyncio.create_task(spool.append(b"y" * 1000))
    await wait_until(gate.entered.is_set, what="the write to start")
    spool.close()
    assert len(fds_into(tmp_path)) == 1  # the write still uses the file: it stays open
    gate.release.set()
    await asyncio.wait({task}, timeout=30)
    assert task.done()
    await wait_until(lambda: open_fds() == before, what="the spool file to be closed")
    assert fds_into(tmp_path) == []


async def test_cancelled_append_keeps_no_fd_and_breaks_the_spool(tmp_path, monkeypatch):
    before = open_fds()
    spool = ResponseSpool(0, tmp_path, 1 << 20)
    gate = GatedPwrite()
    monkeypatch.setattr(os, "pwrite", gate)
    task = asyncio.create_task(spool.append(b"z" * 1000))
    await wait_until(gate.entered.is_set, what="the append to start writing")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(SpoolError, match="cancelled"):
        await spool.append(b"more")
    spool.close()
    assert len(fds_into(tmp_path)) == 1  # the cancelled write still runs in its thread
    gate.release.set()
    await wait_until(lambda: open_fds() == before, what="the spool file to be closed")


async def test_file_writes_run_off_the_event_loop(tmp_path, monkeypatch):
    threads: list[int] = []
    real = os.pwrite

    def recording_pwrite(fd, data, offset):
        threads.append(threading.get_ident())
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    spool = ResponseSpool(0, tmp_path, 1 << 20)
    await spool.append(b"q" * 1000)
    spool.finish()
    assert await read_all(spool) == b"q" * 1000
    spool.close()
    assert threads and threading.get_ident() not in threads


async def test_misuse_gets_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="limits"):
        ResponseSpool(-1, tmp_path, 10)
    spool = ResponseSpool(10, tmp_path, 10)
    spool.finish()
    with pytest.raises(SpoolError, match="after finish"):
        await spool.append(b"a")
    spool.close()
    bad = ResponseSpool(0, tmp_path / "missing", 100)
    with pytest.raises(SpoolError, match="cannot create a spool file"):
        await bad.append(b"a")
    bad.close()


async def test_a_full_spool_waits_for_the_reader_and_retries(tmp_path):
    parts = pieces(seed=3, count=200, largest=2000)
    spool = ResponseSpool(1000, tmp_path, 5000, read_size=700)
    first_full = asyncio.Event()
    fulls = 0
    most = 0
    got: list[bytes] = []

    async def produce() -> None:
        nonlocal fulls, most
        for p in parts:
            while True:
                try:
                    await spool.append(p)
                    break
                except SpoolFull:
                    fulls += 1
                    first_full.set()
                    await spool.wait_drained()
            most = max(most, spool.memory_bytes, spool.disk_bytes)
        spool.finish()

    async def consume() -> None:
        await first_full.wait()
        async for c in spool.chunks():
            got.append(c)

    async with asyncio.timeout(60):
        await asyncio.gather(produce(), consume())
    assert b"".join(got) == b"".join(parts)
    assert fulls >= 1 and most <= 5000
    spool.close()
