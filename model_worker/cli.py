"""The worker process: settings, logging, load the model, then serve on the Unix socket until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from model_worker import logs
from model_worker.model_dir import ModelLoadError, resolve_model_dir
from model_worker.settings import WorkerSettings, load_settings

if TYPE_CHECKING:  # torch and transformers load only after logging is set up
    from model_worker.inference import Engine

log = structlog.get_logger("model_worker")

EXIT_BOOT_ERROR = 3  # gunicorn's convention: the worker cannot start, restarting will not help


def _offline_environment() -> None:
    """Weights come from local folders only: forbid hub access before transformers is imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _remove_socket(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


async def serve(settings: WorkerSettings, engine: Engine) -> None:
    from aiohttp import web

    from model_worker.app import STATS, make_app

    app = make_app(settings, engine)
    # handler_cancellation: a client that hangs up cancels its handler at once, whose `finally`
    # stops the generation; otherwise the worker notices only on its next write, and a generation
    # that holds its text back (half a UTF-8 character, a stop-sequence prefix, a non-streamed
    # answer) would run to max_tokens for nobody.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                           shutdown_timeout=settings.shutdown_timeout_s)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    path = settings.socket_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_socket(path)  # a stale file from a killed worker would make bind fail
        site = web.UnixSite(runner, str(path))
        await site.start()
        log.info("listening", socket=str(path), model=engine.loaded.name, task=engine.loaded.task,
                 device=str(engine.loaded.device), pid=os.getpid())
        await stop.wait()
        log.info("stopping", inflight=app[STATS].requests_inflight)
    finally:
        await runner.cleanup()  # stop accepting, let in-flight requests finish, close the inference thread
        _remove_socket(path)
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    _offline_environment()
    logs.configure(settings.log_level)
    try:
        return _run(settings)
    except Exception:  # the top level: one JSON line with the traceback (a CUDA OOM at load shows here)
        log.exception("worker_failed")
        return 1


def _run(settings: WorkerSettings) -> int:
    try:
        path = resolve_model_dir(settings.model)  # before the heavy imports: a wrong path fails at once
        log.info("loading_model", model=settings.model, path=str(path), device=settings.device,
                 dtype=settings.dtype, task=settings.task or "auto", fault=settings.fault)
        logs.quiet_transformers()
        from model_worker.inference import Engine
        from model_worker.loading import load_model

        loaded = load_model(settings, path)
    except ModelLoadError as exc:
        log.error("model_load_failed", model=settings.model, error=str(exc))
        return EXIT_BOOT_ERROR
    log.info("model_loaded", model=loaded.name, path=str(loaded.path), task=loaded.task, device=str(loaded.device),
             dtype=str(loaded.dtype).removeprefix("torch."), params=loaded.parameters,
             context_length=loaded.context_length, load_seconds=round(loaded.load_seconds, 3))
    engine = Engine(loaded, settings.fault)
    del loaded  # the engine alone holds the model, so sleep level 2 can free it
    try:
        asyncio.run(serve(settings, engine))
    except OSError as exc:  # the socket cannot be bound (path too long, no such folder, in use)
        log.error("listen_failed", socket=str(settings.socket_path), error=str(exc))
        return EXIT_BOOT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
