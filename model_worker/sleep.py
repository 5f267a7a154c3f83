"""Sleep mode, seen from the event loop: the worker's sleep state (its one writer), the gate that keeps
inference requests out unless awake, and the sleep and wake moves, one at a time.

The names and shapes are vLLM's (`POST /sleep?level=1|2`, `POST /wake_up`, `GET /is_sleeping`). A sleep
lets the requests already admitted finish (none is cut) while new ones get 503 `asleep`; the weights
move on the inference thread, after every job queued there before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from enum import Enum
from typing import Any

import structlog

from model_worker import weights
from model_worker.inference import Engine
from model_worker.openai_api import ApiError

log = structlog.get_logger("model_worker.sleep")

SLEEP_LEVELS = (1, 2)  # 1: weights to host memory; 2: weights dropped, read again from the model folder


class SleepState(Enum):
    AWAKE = "awake"
    FALLING_ASLEEP = "falling_asleep"   # new requests refused; admitted ones finishing; then the weights move
    ASLEEP = "asleep"
    WAKING = "waking"


_MOVES: dict[SleepState, frozenset[SleepState]] = {
    SleepState.AWAKE: frozenset({SleepState.FALLING_ASLEEP}),
    SleepState.FALLING_ASLEEP: frozenset({SleepState.ASLEEP}),   # a failed offload counts as asleep too
    SleepState.ASLEEP: frozenset({SleepState.WAKING}),
    SleepState.WAKING: frozenset({SleepState.AWAKE, SleepState.ASLEEP}),  # asleep: the wake failed
}

_REFUSALS = {
    SleepState.FALLING_ASLEEP: "The model is going to sleep; wake it with POST /wake_up, then retry.",
    SleepState.ASLEEP: "The model is asleep (sleep level {level}); wake it with POST /wake_up, then retry.",
    SleepState.WAKING: "The model is waking up; retry shortly.",
}


def parse_level(raw: str | None) -> int:
    """`?level=` of POST /sleep: 1 when absent, as vLLM's; anything but 1 or 2 is a 400."""
    if raw is None:
        return 1
    if raw in ("1", "2"):
        return int(raw)
    raise ApiError(400, f"`level` must be 1 (weights kept in host memory) or 2 (weights dropped, read again "
                        f"from the model folder on wake), got {raw!r}.", param="level", code="invalid_value")


class SleepControl:
    """Owns the sleep state; the only writer of it. Moves run one at a time (a lock), each as a task of
    its own, so a caller that hangs up does not stop a move halfway; `close` awaits them."""

    def __init__(self, engine: Engine, executor: ThreadPoolExecutor) -> None:
        self._engine = engine
        self._executor = executor
        self.state = SleepState.AWAKE
        self.level: int | None = None          # the level asleep (or falling asleep) at; None awake
        self.held = weights.measure_model(engine.loaded.model)  # measured after each move, on the thread
        self._lock = asyncio.Lock()
        self._serving = 0                      # inference requests admitted and not yet ended
        self._idle = asyncio.Event()
        self._idle.set()
        self._moves: set[asyncio.Task[dict[str, Any]]] = set()

    @property
    def sleeping(self) -> bool:
        """Not serving: asleep, or on the way in or out of it."""
        return self.state is not SleepState.AWAKE

    def status(self) -> dict[str, Any]:
        """GET /is_sleeping's body: vLLM's `is_sleeping` and, for people and tests, what is held."""
        return {"is_sleeping": self.sleeping, "state": self.state.value, "level": self.level,
                "weights": self.held.as_dict()}

    # -- the gate --

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Admit one inference request, or answer 503 `asleep`; a sleep waits until every admitted one ends."""
        if self.state is not SleepState.AWAKE:
            raise ApiError(503, _REFUSALS[self.state].format(level=self.level), type="asleep", code="asleep",
                           headers={"Retry-After": "1", "X-Worker-Error": "asleep"})
        self._serving += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._serving -= 1
            if self._serving == 0:
                self._idle.set()

    # -- moves --

    async def sleep(self, level: int) -> dict[str, Any]:
        return await self._run(self._sleep(level))

    async def wake(self) -> dict[str, Any]:
        return await self._run(self._wake())

    async def close(self) -> None:
        """At shutdown: cancel the moves still waiting (their callers are gone) and await them."""
        for task in self._moves:
            task.cancel()
        await asyncio.gather(*self._moves, return_exceptions=True)

    async def _run(self, move: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        task = asyncio.create_task(self._one_at_a_time(move))
        self._moves.add(task)
        task.add_done_callback(self._moved)
        return await asyncio.shield(task)

    def _moved(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self._moves.discard(task)
        if not task.cancelled():
            task.exception()  # its caller may have hung up: the outcome is logged by the move itself

    async def _one_at_a_time(self, move: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        try:
            async with self._lock:
                return await move
        finally:
            move.close()  # a move cancelled while it waited for the lock never started

    async def _sleep(self, level: int) -> dict[str, Any]:
        started = time.monotonic()
        if self.state is SleepState.ASLEEP:  # idempotent: already asleep (at whichever level) is success
            return self._answer(started)
        self.level = level
        self._move(SleepState.FALLING_ASLEEP, sleep_level=level, waiting_for=self._serving)
        await self._idle.wait()
        loop = asyncio.get_running_loop()
        try:
            self.held = await loop.run_in_executor(self._executor, weights.offload, self._engine, level)
        except RuntimeError as exc:  # host memory or CUDA errors while moving
            self.held = await loop.run_in_executor(self._executor, weights.measure, self._engine)
            self._move(SleepState.ASLEEP, sleep_level=level, error=str(exc))
            raise ApiError(500, f"The worker failed to go to sleep: {exc}. It serves no requests until "
                                f"POST /wake_up puts its weights back.", type="server_error",
                           code="sleep_failed") from exc
        self._move(SleepState.ASLEEP, sleep_level=level, seconds=round(time.monotonic() - started, 3),
                   weights_device=self.held.device, parameters_held=self.held.parameters)
        return self._answer(started)

    async def _wake(self) -> dict[str, Any]:
        started = time.monotonic()
        if self.state is SleepState.AWAKE:  # idempotent
            return self._answer(started)
        self._move(SleepState.WAKING, sleep_level=self.level)
        loop = asyncio.get_running_loop()
        try:
            self.held = await loop.run_in_executor(self._executor, weights.restore, self._engine)
        except RuntimeError as exc:  # the folder is gone or unreadable, the GPU is full
            self.held = await loop.run_in_executor(self._executor, weights.measure, self._engine)
            self._move(SleepState.ASLEEP, sleep_level=self.level, error=str(exc))
            raise ApiError(500, f"The worker failed to wake up: {exc}. It is still asleep.",
                           type="server_error", code="wake_failed") from exc
        self.level = None
        self._move(SleepState.AWAKE, seconds=round(time.monotonic() - started, 3),
                   weights_device=self.held.device)
        return self._answer(started)

    def _move(self, new: SleepState, **fields: Any) -> None:
        old = self.state
        if new not in _MOVES[old]:
            raise RuntimeError(f"sleep state {old.value} -> {new.value} is not a move")
        self.state = new
        log.info("sleep_state", old=old.value, new=new.value, **fields)

    def _answer(self, started: float) -> dict[str, Any]:
        """POST /sleep's and /wake_up's body: the state reached and how long this call took."""
        return {**self.status(), "seconds": round(time.monotonic() - started, 3)}
