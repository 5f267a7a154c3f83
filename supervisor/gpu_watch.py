"""The memory watcher: polls NVML and psutil off the event loop and publishes readings and the pressure level.

No NVML (no driver, no GPU, `gpu.enabled: false`) is a normal mode: host memory and the worker's RSS
are still read, `available` is False. Blocking calls run in daemon threads owned here; a call that
hangs leaves the last reading in place, marked stale, and never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import pynvml
import structlog

from supervisor.config import Gpu, Queue, Thresholds
from supervisor.pressure import CALM, Decision, Level, combined_level, decide

_DEFAULT_PRIORITIES = Queue().priorities


class Nvml:
    """The pynvml calls the watcher makes, and nothing more: the seam tests replace.

    Handles are opaque to the watcher. Every method may raise `pynvml.NVMLError`.
    """

    def init(self) -> None:
        pynvml.nvmlInit()

    def shutdown(self) -> None:
        pynvml.nvmlShutdown()

    def device_count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    def handle(self, index: int) -> Any:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def uuid(self, handle: Any) -> str:
        return _text(pynvml.nvmlDeviceGetUUID(handle))

    def name(self, handle: Any) -> str:
        return _text(pynvml.nvmlDeviceGetName(handle))

    def memory(self, handle: Any) -> tuple[int, int]:
        """(used, total) bytes."""
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used), int(info.total)

    def utilization(self, handle: Any) -> int:
        """GPU busy percent over the driver's last sample period (0..100)."""
        return int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def temperature(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))

    def processes(self, handle: Any) -> list[tuple[int, int | None]]:
        """(pid, usedGpuMemory bytes or None when the driver does not say) of compute processes."""
        return [(int(p.pid), p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]


def count_devices(nvml_factory: Callable[[], Nvml] = Nvml) -> int | None:
    """How many GPUs NVML sees, or None without NVML (blocking: call it in a thread)."""
    nvml = nvml_factory()
    try:
        nvml.init()
    except pynvml.NVMLError:
        return None
    try:
        return nvml.device_count()
    except pynvml.NVMLError:
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            nvml.shutdown()


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py versions return bytes.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# ---- which devices the worker sees -------------------------------------------------------------

def visible_tokens(env: Mapping[str, str]) -> tuple[str, ...] | None:
    """CUDA_VISIBLE_DEVICES split into tokens; None when unset (every device), () when empty (none)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return tuple(t.strip() for t in value.split(",") if t.strip())


def resolve_devices(
    tokens: tuple[str, ...] | None, count: int, uuid_of: Callable[[int], str]
) -> tuple[int, ...]:
    """NVML indices of the devices the tokens name, in the worker's order.

    As CUDA does, the list ends at the first token naming no device ("0,7,1" on 2 GPUs is "0").
    `GPU-...` tokens match a device UUID by prefix; a `MIG-...` token cannot be mapped to its
    device here, so every device is watched. Indices follow NVML's PCI order, which is
    CUDA's only with CUDA_DEVICE_ORDER=PCI_BUS_ID or identical GPUs.
    """
    if tokens is None:
        return tuple(range(count))
    uuids: list[str] | None = None
    chosen: list[int] = []
    for token in tokens:
        if token.lstrip("-").isdigit():
            index = int(token)
        elif token.startswith("GPU-"):
            if uuids is None:
                uuids = [uuid_of(i) for i in range(count)]
            matches = [i for i, u in enumerate(uuids) if u.startswith(token)]
            index = matches[0] if len(matches) == 1 else -1
        elif token.startswith("MIG-"):
            return tuple(range(count))
        else:
            break
        if not 0 <= index < count or index in chosen:
            break
        chosen.append(index)
    return tuple(chosen)


# ---- readings ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DeviceReading:
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization: float | None      # 0..1; None where the device does not report it
    temperature_c: int | None

    @property
    def ratio(self) -> float | None:
        return self.memory_used_bytes / self.memory_total_bytes if self.memory_total_bytes > 0 else None


@dataclass(frozen=True, slots=True)
class Reading:
    """One published snapshot. Replaced whole, never changed."""

    at: float                              # time.monotonic() when published
    available: bool                        # NVML answered the last poll
    devices: tuple[DeviceReading, ...]
    host_used_bytes: int | None
    host_total_bytes: int | None
    worker_rss_bytes: int | None           # None: no worker (or it vanished)
    worker_gpu_memory_bytes: int | None    # None: NVML unavailable or no worker
    level: Level
    stale: bool = False                    # a poll is still running; some figures are from an earlier one
    replicas: Mapping[Any, tuple[int | None, int | None]] = dataclasses.field(default_factory=dict)
    # per replica key: (RSS of its process tree, GPU memory NVML sees its tree hold)
    ours_by_device: Mapping[int, int] = dataclasses.field(default_factory=dict)
    # per GPU index: bytes NVML sees held by the process trees of our replicas

    @property
    def host_ratio(self) -> float | None:
        if not self.host_total_bytes or self.host_used_bytes is None:
            return None
        return self.host_used_bytes / self.host_total_bytes


@dataclass(frozen=True, slots=True)
class _HostSample:
    used: int
    total: int
    tree_pids: frozenset[int]
    tree_rss: int | None
    trees: Mapping[Any, tuple[frozenset[int], int | None]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _GpuSample:
    devices: tuple[DeviceReading, ...]
    processes: tuple[tuple[int, int], ...]    # (pid, bytes) on the watched devices
    by_device: Mapping[int, tuple[tuple[int, int], ...]] = dataclasses.field(default_factory=dict)


def _tree(pid: int) -> tuple[frozenset[int], int | None]:
    """The pids and summed RSS of a process and its descendants (None: gone)."""
    pids: set[int] = set()
    rss: int | None = None
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:      # gone (or not ours to see): no worker to measure
        tree = []
    for proc in tree:
        try:
            mem = proc.memory_info().rss
        except psutil.Error:  # vanished (or a zombie) since the listing
            continue
        pids.add(proc.pid)
        rss = (rss or 0) + mem
    return frozenset(pids), rss


def _trees(roots: Mapping[Any, int]) -> dict[Any, tuple[frozenset[int], int | None]]:
    """Each root's process tree (pids, summed RSS) from ONE walk of the process table, however many
    roots (psutil's children() walks the whole table per call)."""
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info.get("ppid")
        if ppid:
            children.setdefault(ppid, []).append(proc.pid)
    out: dict[Any, tuple[frozenset[int], int | None]] = {}
    for key, root in roots.items():
        pids: set[int] = set()
        rss: int | None = None
        stack = [root]
        while stack:
            p = stack.pop()
            try:
                mem = psutil.Process(p).memory_info().rss
            except psutil.Error:  # gone (or a zombie) since the listing
                continue
            pids.add(p)
            rss = (rss or 0) + mem
            stack.extend(children.get(p, ()))
        out[key] = (frozenset(pids), rss)
    return out


def _sample_host(pid: int | None, replica_pids: Mapping[Any, int] | None = None) -> _HostSample:
    vm = psutil.virtual_memory()
    trees = _trees(replica_pids) if replica_pids else {}
    if pid is not None:
        pids, rss = trees.get("__single__") or _tree(pid)
    elif trees:
        pids = frozenset().union(*(t[0] for t in trees.values()))
        rsses = [t[1] for t in trees.values() if t[1] is not None]
        rss = sum(rsses) if rsses else None
    else:
        pids, rss = frozenset(), None
    return _HostSample(used=vm.total - vm.available, total=vm.total, tree_pids=pids, tree_rss=rss, trees=trees)


# A figure some devices, drivers or containers do not give (MIG, an old driver, no permission):
# missing, not a failed poll.
_NOT_GIVEN = (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NoPermission)


def _optional(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except _NOT_GIVEN:
        return None


def _sample_gpu(nvml: Nvml, tokens: tuple[str, ...] | None) -> _GpuSample:
    count = nvml.device_count()
    indices = resolve_devices(tokens, count, lambda i: nvml.uuid(nvml.handle(i)))
    devices: list[DeviceReading] = []
    procs: list[tuple[int, int]] = []
    by_device: dict[int, tuple[tuple[int, int], ...]] = {}
    for index in indices:
        h = nvml.handle(index)
        used, total = nvml.memory(h)
        util = _optional(lambda: nvml.utilization(h))
        devices.append(DeviceReading(
            index=index,
            name=nvml.name(h),
            memory_used_bytes=used,
            memory_total_bytes=total,
            utilization=None if util is None else util / 100.0,
            temperature_c=_optional(lambda: nvml.temperature(h)),
        ))
        mine = tuple((pid, mem or 0) for pid, mem in (_optional(lambda: nvml.processes(h)) or ()))
        by_device[index] = mine
        procs.extend(mine)
    return _GpuSample(devices=tuple(devices), processes=tuple(procs), by_device=by_device)


# ---- the thread the blocking calls run in ------------------------------------------------------

class _Runner:
    """One daemon thread running blocking calls in order, answering through asyncio futures.

    A daemon thread, unlike an executor's, cannot hold up interpreter exit when NVML never returns.
    """

    def __init__(self, name: str):
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put((loop, fut, fn))
        return fut

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, fut, fn = job
            try:
                outcome: tuple[bool, Any] = (True, fn())
            except Exception as exc:  # handed to the awaiting coroutine, which decides
                outcome = (False, exc)
            try:
                loop.call_soon_threadsafe(_settle, fut, outcome)
            except RuntimeError:      # the loop closed while we were blocked
                return


def _settle(fut: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if fut.done():
        return
    ok, value = outcome
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


# ---- the watcher -------------------------------------------------------------------------------

class GpuWatcher:
    """Polls every `gpu.poll_interval_s`, publishes `reading`, `level` and `decision`.

    `run()` is owned by its caller, which cancels and awaits it; NVML is shut down on the way out.
    """

    def __init__(
        self,
        gpu: Gpu,
        host_thresholds: Thresholds,
        worker_pid: Callable[[], int | None],
        nvml_factory: Callable[[], Nvml] = Nvml,
        *,
        worker_env: Mapping[str, str] | None = None,
        priorities: Sequence[str] = _DEFAULT_PRIORITIES,
        on_reading: Callable[[Reading], None] | None = None,
        shutdown_timeout_s: float = 2.0,
        replica_pids: Callable[[], Mapping[Any, int]] | None = None,
    ):
        self._replica_pids = replica_pids
        self._gpu = gpu
        self._host_thr = host_thresholds
        self._worker_pid = worker_pid
        self._nvml_factory = nvml_factory
        self._tokens = visible_tokens(worker_env or {})
        self._priorities = tuple(priorities)
        self._on_reading = on_reading
        self._shutdown_timeout_s = shutdown_timeout_s
        self._log = structlog.get_logger(__name__)

        self._nvml: Nvml | None = None
        self._nvml_state = "off"           # off | starting | ok | error
        self._host_sample: _HostSample | None = None
        self._gpu_sample: _GpuSample | None = None
        self._host_job: asyncio.Future[Any] | None = None
        self._gpu_job: asyncio.Future[Any] | None = None
        self._stalled: set[str] = set()

        self.reading: Reading | None = None
        self.level = Level.OK
        self.decision: Decision = CALM
        self._changed = asyncio.Event()

    # -- what others read

    @property
    def available(self) -> bool:
        return self._nvml_state == "ok"

    def set_worker_env(self, env: Mapping[str, str]) -> None:
        """The env the (next) worker runs with: its CUDA_VISIBLE_DEVICES picks the watched devices."""
        self._tokens = visible_tokens(env)

    async def wait_reading(self, newer_than: Reading | None = None) -> Reading:
        """The first reading published after `newer_than` (or the current one, if any, when None)."""
        while self.reading is None or self.reading is newer_than:
            await self._changed.wait()
        return self.reading

    def status(self) -> dict[str, Any]:
        """The /status `gpu` block."""
        r = self.reading
        host_ratio = r.host_ratio if r else None
        return {
            "available": self.available,
            "pressure": self.level.label,
            "stale": r.stale if r else False,
            "devices": [dataclasses.asdict(d) for d in r.devices] if r else [],
            "host": {
                "used_bytes": r.host_used_bytes if r else None,
                "total_bytes": r.host_total_bytes if r else None,
                "ratio": round(host_ratio, 4) if host_ratio is not None else None,
            },
            "worker": {
                "rss_bytes": r.worker_rss_bytes if r else None,
                "gpu_memory_bytes": r.worker_gpu_memory_bytes if r else None,
            },
        }

    # -- the loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        host_runner = _Runner("gpu-watch-host")
        gpu_runner = _Runner("gpu-watch-nvml")
        try:
            if self._gpu.enabled is False:
                self._log.info("nvml_disabled")
            else:
                self._nvml = self._nvml_factory()
                self._nvml_state = "starting"
                self._gpu_job = gpu_runner.submit(self._nvml.init)
            interval = self._gpu.poll_interval_s
            deadline = loop.time()
            while True:
                deadline += interval
                await self._tick(host_runner, gpu_runner, deadline)
                now = loop.time()
                if deadline <= now:       # fell behind (slow poll): start afresh, no burst of ticks
                    deadline = now
                else:
                    await asyncio.sleep(deadline - now)
        finally:
            for job in (self._host_job, self._gpu_job):
                if job is not None:
                    job.cancel()      # its thread may still finish; nobody waits for the answer
            self._host_job = None
            await self._shutdown(gpu_runner)
            host_runner.close()
            gpu_runner.close()

    async def _tick(self, host_runner: _Runner, gpu_runner: _Runner, deadline: float) -> None:
        pid = self._worker_pid()
        rpids = dict(self._replica_pids()) if self._replica_pids is not None else None
        if self._host_job is None:
            self._host_job = host_runner.submit(lambda: _sample_host(pid, rpids))
        if self._gpu_job is None and self._nvml_state in ("ok", "error"):
            nvml, tokens = self._nvml, self._tokens
            self._gpu_job = gpu_runner.submit(lambda: _sample_gpu(nvml, tokens))
        pending = {j for j in (self._host_job, self._gpu_job) if j is not None}
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        await asyncio.wait(pending, timeout=timeout)

        stale = False
        if self._host_job is not None:
            if self._host_job.done():
                self._host_sample = self._host_job.result()
                self._host_job = None
                self._resumed("host")
            else:
                stale |= self._stall("host")
        if self._gpu_job is not None:
            if self._gpu_job.done():
                job, self._gpu_job = self._gpu_job, None
                part = "nvml_init" if self._nvml_state == "starting" else "nvml"
                self._absorb_gpu(job)
                self._resumed(part)
            elif self._nvml_state == "starting":
                self._stall("nvml_init")   # no GPU figures yet, so nothing is stale
            else:
                stale |= self._stall("nvml")
        self._publish(pid, stale)

    def _absorb_gpu(self, job: asyncio.Future[Any]) -> None:
        exc = job.exception()
        if self._nvml_state == "starting":
            if exc is None:
                self._nvml_state = "ok"
                self._log.info("nvml_ready")
            elif isinstance(exc, pynvml.NVMLError):
                self._nvml_state = "off"
                log = self._log.warning if self._gpu.enabled is True else self._log.info
                log("nvml_unavailable", reason=str(exc), error=type(exc).__name__,
                    enabled=self._gpu.enabled)
            else:
                raise exc
            return
        if exc is None:
            self._gpu_sample = job.result()
            if self._nvml_state == "error":
                self._log.info("nvml_recovered")
            self._nvml_state = "ok"
        elif isinstance(exc, pynvml.NVMLError):
            self._gpu_sample = None
            if self._nvml_state != "error":
                self._log.warning("nvml_error", reason=str(exc), error=type(exc).__name__)
            self._nvml_state = "error"
        else:
            raise exc

    def _stall(self, part: str) -> bool:
        if part not in self._stalled:
            self._stalled.add(part)
            self._log.warning("gpu_poll_stalled", part=part, interval_s=self._gpu.poll_interval_s)
        return True

    def _resumed(self, part: str) -> None:
        if part in self._stalled:
            self._stalled.discard(part)
            self._log.info("gpu_poll_resumed", part=part)

    def _publish(self, pid: int | None, stale: bool) -> None:
        host = self._host_sample
        gpu = self._gpu_sample if self._nvml_state == "ok" else None
        worker_gpu: int | None = None
        if gpu is not None and host is not None and (pid is not None or host.trees):
            worker_gpu = sum(mem for p, mem in gpu.processes if p in host.tree_pids)
        replicas: dict[Any, tuple[int | None, int | None]] = {}
        if host is not None:
            for key, (pids, rss) in host.trees.items():
                g = sum(mem for p, mem in gpu.processes if p in pids) if gpu is not None else None
                replicas[key] = (rss, g)
        devices = gpu.devices if gpu is not None else ()
        host_ratio = host.used / host.total if host and host.total else None
        previous = self.level
        self.level = combined_level(
            [r for d in devices if (r := d.ratio) is not None], host_ratio,
            self._gpu.thresholds, self._host_thr, previous, self._gpu.hysteresis,
        )
        now = time.monotonic()
        decision = decide(self.level, self._gpu.actions, self._priorities, now,
                          self.decision.critical_since, previous=previous)
        if stale:   # never restart the worker on figures we could not refresh
            decision = dataclasses.replace(decision, restart=False)
        self.decision = decision
        if self.level != previous:
            self._log.info("pressure_changed", old=previous.label, new=self.level.label, stale=stale)
        self.reading = Reading(
            at=now,
            available=self.available,
            devices=devices,
            host_used_bytes=host.used if host else None,
            host_total_bytes=host.total if host else None,
            worker_rss_bytes=host.tree_rss if host else None,
            worker_gpu_memory_bytes=worker_gpu,
            level=self.level,
            stale=stale,
            replicas=replicas,
            ours_by_device={idx: sum(mem for p, mem in procs if p in host.tree_pids)
                            for idx, procs in gpu.by_device.items()} if gpu is not None and host is not None else {},
        )
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._on_reading is not None:
            self._on_reading(self.reading)

    async def _shutdown(self, gpu_runner: _Runner) -> None:
        if self._nvml is None or self._nvml_state == "off":
            return
        nvml = self._nvml
        self._nvml_state = "off"
        # Queued behind any hung call; wait a bounded time, the thread is a daemon either way.
        # If init itself is still running, shutdown is queued after it and pairs with it.
        self._gpu_job = None
        job = gpu_runner.submit(nvml.shutdown)
        done, _ = await asyncio.wait({job}, timeout=self._shutdown_timeout_s)
        if not done:
            self._log.warning("nvml_shutdown_timeout", timeout_s=self._shutdown_timeout_s)
        elif (exc := job.exception()) is not None:
            if not isinstance(exc, pynvml.NVMLError):
                raise exc
            self._log.info("nvml_shutdown_failed", reason=str(exc))
