"""Moves of the weights for sleep mode, run on the inference thread: offload (level 1: to host memory;
level 2: dropped), restore (back on the device they ran on, or read again from the model folder), and
the measure of what the process still holds, which /is_sleeping reports."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch

from model_worker.inference import Engine, WorkerOutOfMemory, free_device_memory
from model_worker.loading import reload_model


@dataclass(frozen=True, slots=True)
class WeightsHeld:
    """What the process holds of the model's weights, measured from the model object itself."""

    device: str | None               # where its parameters are; None when no model object is alive
    parameters: int                  # parameters still held (0 once the model object is freed)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "parameters": self.parameters}


def measure_model(model: Any) -> WeightsHeld:
    if model is None:
        return WeightsHeld(None, 0)
    params = list(model.parameters())
    device = str(params[0].device) if params else None
    return WeightsHeld(device, sum(p.numel() for p in params))


def measure(engine: Engine) -> WeightsHeld:
    return measure_model(engine.loaded.model)


def offload(engine: Engine, level: int) -> WeightsHeld:
    """Level 1: the weights go to host memory; level 2: the model object is dropped. Either way the
    CUDA cache is freed. Returns what is still held: after a drop, a model object something still
    refers to is measured through a weak reference, so the answer cannot claim memory it did not free."""
    loaded = engine.loaded
    model = loaded.model
    if model is None:  # a failed wake left it dropped: nothing to move
        return WeightsHeld(None, 0)
    if level == 1:
        model.to("cpu")
        free_device_memory()
        return measure_model(model)
    ref = weakref.ref(model)
    engine.loaded = replace(loaded, model=None)
    del model, loaded
    free_device_memory()
    return measure_model(ref())


def restore(engine: Engine) -> WeightsHeld:
    """Put the weights back on the device they ran on (reading them again if they were dropped).

    On a CUDA out-of-memory the weights go back to host memory and the cache is freed, so a failed
    wake holds on the GPU what it held asleep; then WorkerOutOfMemory goes up."""
    loaded = engine.loaded
    try:
        if loaded.model is None:
            engine.loaded = reload_model(loaded)
        else:
            loaded.model.to(loaded.device)
    except torch.cuda.OutOfMemoryError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
    else:
        return measure(engine)
    # Outside the except block the failed frames (and a half-loaded model) are released.
    del loaded
    if engine.loaded.model is not None:
        engine.loaded.model.to("cpu")
    free_device_memory()
    raise WorkerOutOfMemory(message)
