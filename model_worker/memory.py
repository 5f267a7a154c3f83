"""Memory figures (process RSS, torch CUDA allocator) for GET /memory and POST /cleanup."""

from __future__ import annotations

from typing import Any

import psutil
import torch

from model_worker.inference import free_device_memory


def snapshot(device: str) -> dict[str, Any]:
    """Blocking (reads /proc); call it from a thread."""
    figures: dict[str, Any] = {
        "rss_bytes": psutil.Process().memory_info().rss,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        # memory_* read the allocator's counters; they do not create a context on an unused device.
        for index in range(torch.cuda.device_count()):
            figures["cuda"].append({
                "index": index,
                "allocated_bytes": torch.cuda.memory_allocated(index),
                "reserved_bytes": torch.cuda.memory_reserved(index),
                "max_allocated_bytes": torch.cuda.max_memory_allocated(index),
            })
    return figures


def cleanup(device: str) -> dict[str, Any]:
    """gc + empty_cache, with the figures before and after. Blocking; call it from a thread."""
    before = snapshot(device)
    free_device_memory()
    after = snapshot(device)
    return {"before": before, "after": after}
