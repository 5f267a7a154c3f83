"""The one fake in the suite: a stand-in for the `Nvml` seam of supervisor/gpu_watch.py."""

from __future__ import annotations

import threading

import pynvml


class FakeNvml:
    """Stands in for the `Nvml` seam: devices whose figures the test sets; nothing else is faked."""

    def __init__(self, devices: int = 1, total: int = 1000, uuids: list[str] | None = None):
        self.total = [total] * devices
        self.used = [0] * devices
        self.uuids = uuids or [f"GPU-{i:08x}-0000" for i in range(devices)]
        self.procs: dict[int, list[tuple[int, int | None]] | None] = {i: [] for i in range(devices)}
        self.init_error: pynvml.NVMLError | None = None
        self.init_gate: threading.Event | None = None    # init() blocks on it while set
        self.fail: pynvml.NVMLError | None = None        # memory() raises it while set
        self.gate: threading.Event | None = None         # memory() blocks on it while set
        self.entered = threading.Event()                 # memory() reached the gate
        self.init_calls = 0
        self.shutdown_calls = 0

    def init(self) -> None:
        self.init_calls += 1
        if self.init_gate is not None:
            self.init_gate.wait(timeout=15)
        if self.init_error is not None:
            raise self.init_error

    def shutdown(self) -> None:
        self.shutdown_calls += 1

    def device_count(self) -> int:
        return len(self.total)

    def handle(self, index: int) -> int:
        return index

    def uuid(self, handle: int) -> str:
        return self.uuids[handle]

    def name(self, handle: int) -> str:
        return f"Fake GPU {handle}"

    def memory(self, handle: int) -> tuple[int, int]:
        gate = self.gate
        if gate is not None:
            self.entered.set()
            gate.wait(timeout=15)   # bounded, so a watcher that calls this on the loop fails, not hangs
        if self.fail is not None:
            raise self.fail
        return self.used[handle], self.total[handle]

    def utilization(self, handle: int) -> int:
        return 40

    def temperature(self, handle: int) -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def processes(self, handle: int) -> list[tuple[int, int | None]]:
        if self.procs[handle] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)   # an older driver
        return list(self.procs[handle])
