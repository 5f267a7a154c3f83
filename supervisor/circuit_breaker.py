"""The circuit breaker: a count-based window of outcomes, and when to stop sending to the worker.

Pure: every method takes `now` (monotonic seconds); the owner logs transitions via `on_change`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .config import Breaker as BreakerSettings
from .states import BreakerState

OnChange = Callable[[BreakerState, BreakerState, str], None]
SPREAD_WINDOW_S = 60.0  # 500s from two clients within this long count as the worker's failure


class CircuitBreaker:
    def __init__(self, settings: BreakerSettings, on_change: OnChange | None = None):
        self.settings = settings
        self.state = BreakerState.CLOSED
        self._on_change = on_change
        self._window: deque[tuple[bool, bool]] = deque(maxlen=settings.window)  # (failed, slow)
        self._failures = 0
        self._slow = 0
        self._opened_at = 0.0
        self._open_for = settings.open_s
        self._reopens = 0
        self._probes_out = 0
        self._probe_ok = 0
        self._half_open_at = 0.0
        self._streak500 = 0  # 500 answers in a row with no other answer between
        self._recent500: deque[tuple[float, str | None]] = deque(maxlen=max(8, settings.window))

    # -- configuration -------------------------------------------------------------------------
    def reconfigure(self, settings: BreakerSettings) -> None:
        """Apply new thresholds; keep the state and as much of the window as still fits."""
        old = list(self._window)[-settings.window:]
        self.settings = settings
        self._window = deque(old, maxlen=settings.window)
        self._failures = sum(1 for f, _ in self._window if f)
        self._slow = sum(1 for _, s in self._window if s)
        self._open_for = min(max(self._open_for, settings.open_s), settings.open_max_s)

    # -- queries -------------------------------------------------------------------------------
    @property
    def failure_rate(self) -> float:
        return self._failures / len(self._window) if self._window else 0.0

    @property
    def slow_rate(self) -> float:
        return self._slow / len(self._window) if self._window else 0.0

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker lets a call through again (0 when it does now)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self._open_for - now)
        if self.state is BreakerState.FORCED_OPEN:
            return self._open_for
        return 0.0

    def allow(self, now: float) -> bool:
        """May a call go to the worker now? In half-open, each True reserves one probe."""
        st = self.state
        if st is BreakerState.CLOSED:
            return True
        if st is BreakerState.OPEN:
            if now - self._opened_at < self._open_for:
                return False
            self._half_open_at = now
            self._move(BreakerState.HALF_OPEN, f"open for {self._open_for:g}s")
            self._probes_out = 0
            self._probe_ok = 0
            st = self.state
        if st is BreakerState.HALF_OPEN:
            if self._probes_out < self.settings.half_open_probes:
                self._probes_out += 1
                return True
            return False
        return False  # forced open

    def would_allow(self, now: float) -> bool:
        """Like allow() but reserves nothing (for admission before queueing)."""
        st = self.state
        if st is BreakerState.CLOSED:
            return True
        if st is BreakerState.OPEN:
            return now - self._opened_at >= self._open_for
        if st is BreakerState.HALF_OPEN:
            return self._probes_out < self.settings.half_open_probes
        return False

    # -- outcomes ------------------------------------------------------------------------------
    def record(self, ok: bool, duration_s: float, now: float, started: float | None = None,
               _from500: bool = False) -> None:
        if not _from500:
            self._streak500 = 0
        s = self.settings
        slow = s.slow_call_s is not None and duration_s >= s.slow_call_s
        if self.state is BreakerState.HALF_OPEN:
            if started is not None and started < self._half_open_at:
                return  # a call from before the breaker opened is no probe: its answer says nothing new
            if not ok or slow:
                self._trip(now, "probe failed" if not ok else "probe slow", reopen=True)
            else:
                self._probe_ok += 1
                if self._probe_ok >= s.half_open_probes:
                    self._close("probes succeeded")
            return
        if self.state is not BreakerState.CLOSED:
            return  # late answers from before the breaker opened do not move it
        w = self._window
        if len(w) == w.maxlen:
            f0, s0 = w[0]
            self._failures -= f0
            self._slow -= s0
        w.append((not ok, slow))
        self._failures += not ok
        self._slow += slow
        if (self._failures or self._slow) and len(w) >= s.min_calls:  # (none of either: nothing to trip on)
            if self.failure_rate >= s.failure_rate:
                self._trip(now, f"failure rate {self.failure_rate:.2f} >= {s.failure_rate:g}")
            elif s.slow_call_s is not None and self.slow_rate >= s.slow_call_rate:
                self._trip(now, f"slow-call rate {self.slow_rate:.2f} >= {s.slow_call_rate:g}")

    def record_server_error(self, duration_s: float, now: float, started: float | None, client: str | None,
                            worker_failing: bool) -> bool:
        """A 500 answer: the worker's failure only when the worker also fails otherwise (its health
        probes), when 500s come from several clients, or when nothing but 500s comes back. One client's
        bad requests must not open the breaker for everyone. True when it was counted."""
        self._streak500 += 1
        self._recent500.append((now, client))
        clients = {c for t, c in self._recent500 if now - t <= SPREAD_WINDOW_S}
        if worker_failing or len(clients) >= 2 or self._streak500 >= self.settings.min_calls:
            # nothing but 500s for min_calls answers: the ones not counted so far count now too
            n = self.settings.min_calls if self._streak500 == self.settings.min_calls else 1
            for _ in range(n):
                if self.state is not BreakerState.CLOSED and n > 1:
                    break
                self.record(False, duration_s, now, started, _from500=True)
            return True
        self.release_probe()
        return False

    def release_probe(self) -> None:
        """A reserved half-open probe ended without an outcome (client left, request rejected)."""
        if self.state is BreakerState.HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1

    # -- forced open (crash loop) --------------------------------------------------------------
    def force_open(self, reason: str) -> None:
        if self.state is not BreakerState.FORCED_OPEN:
            self._move(BreakerState.FORCED_OPEN, reason)

    def release_forced(self, reason: str) -> None:
        if self.state is BreakerState.FORCED_OPEN:
            self._clear_window()
            self._reopens = 0
            self._open_for = self.settings.open_s
            self._move(BreakerState.CLOSED, reason)

    # -- internals -----------------------------------------------------------------------------
    def _trip(self, now: float, reason: str, reopen: bool = False) -> None:
        s = self.settings
        if reopen:
            self._reopens += 1
            self._open_for = min(s.open_s * (2 ** self._reopens), s.open_max_s)
        else:
            self._reopens = 0
            self._open_for = s.open_s
        self._opened_at = now
        self._clear_window()
        self._move(BreakerState.OPEN, reason)

    def _close(self, reason: str) -> None:
        self._reopens = 0
        self._open_for = self.settings.open_s
        self._clear_window()
        self._move(BreakerState.CLOSED, reason)

    def _clear_window(self) -> None:
        self._window.clear()
        self._failures = 0
        self._slow = 0

    def _move(self, new: BreakerState, reason: str) -> None:
        old, self.state = self.state, new
        if self._on_change is not None and old is not new:
            self._on_change(old, new, reason)
