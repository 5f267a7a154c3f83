"""Fixtures shared by the end-to-end tests: a factory for real supervisor processes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness import SupervisorProcess

# Modules whose tests start real processes (the daemon, model workers, Chromium, Prometheus, systemd
# tools) besides the *_e2e.py files: all of them are the `e2e` tier; `pytest -m "not e2e"` runs the rest
# (pure logic, in-process servers, a throwaway redis-server) in well under a minute.
E2E_MODULES = frozenset({
    "test_model_worker", "test_model_worker_schema", "test_model_worker_supervised", "test_ui",
    "test_grafana_dashboard", "test_sd_notify", "test_status_cli", "test_systemd", "test_workers_selfcheck",
    "test_deploy_kubernetes", "test_gpu_e2e", "test_fake_engine", "test_routing_signals",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if name.endswith("_e2e") or name in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)


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
