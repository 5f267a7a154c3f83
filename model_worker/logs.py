"""Logging: structlog JSON lines on stderr, one line per event, stdlib loggers routed through it."""

from __future__ import annotations

import logging
import sys

import structlog

_SHARED = (
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
)


def configure(level: str = "info") -> None:
    """Configure structlog and the stdlib root logger (aiohttp, transformers, warnings) alike."""
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.format_exc_info,  # a traceback becomes one escaped JSON field
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_SHARED],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))  # third-party debug output is noise here
    logging.captureWarnings(True)


def quiet_transformers() -> None:
    """Send transformers' own logger through the root handler and drop its progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
