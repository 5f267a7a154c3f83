"""Fixtures shared by the end-to-end tests: a factory for real supervisor processes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness import SupervisorProcess


@pytest.fixture
async def supervisor_factory():
    """Start real supervisors: `await supervisor_factory(config_dict, wait_ready=True)`; all stopped after."""
    made: list[SupervisorProcess] = []
    dirs: list[str] = []

    async def make(config: dict, wait_ready: bool = True, env: dict | None = None) -> SupervisorProcess:
        # short directory: Unix socket paths are limited to 107 bytes
        d = tempfile.mkdtemp(prefix="gs-")
        dirs.append(d)
        sp = SupervisorProcess(Path(d), config, env)
        made.append(sp)
        await sp.start(wait_ready=wait_ready)
        return sp

    yield make
    for sp in made:
        await sp.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
