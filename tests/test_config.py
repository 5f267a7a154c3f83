"""Configuration: every problem named with its key path and line; check-config's exit codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml
from pydantic import ValidationError

from supervisor import config as cfg


def problems(text: str) -> list[str]:
    with pytest.raises(cfg.ConfigError) as ei:
        cfg.parse(textwrap.dedent(text))
    return ei.value.problems


def test_defaults_are_the_documented_ones():
    s = cfg.parse("")
    assert s.listen.host == "127.0.0.1" and s.listen.port == 8080
    assert s.queue.priorities == ("critical", "high", "normal", "low")
    assert s.queue.default_priority == "normal"
    assert s.worker.health.failures == 3
    assert s.breaker.open_s == 5 and s.breaker.open_max_s == 60
    assert s.retry.methods == ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")


def test_every_problem_is_listed_with_key_path_and_line():
    probs = problems("""
        listen: {host: 127.0.0.1, port: 99999}
        worker:
          command: []
          restart: {backoff_initial_s: 5, backoff_max_s: 1}
          bogus: 1
        queue:
          default_priority: urgent
    """)
    joined = "\n".join(probs)
    assert "listen.port (line 2)" in joined
    assert "worker.command (line 4)" in joined
    assert "worker.restart (line 5): backoff_max_s must be >= backoff_initial_s" in joined
    assert "worker.bogus (line 6): unknown key" in joined
    assert "queue.default_priority (line 8)" in joined and "'urgent'" in joined
    assert len(probs) == 5


def test_cross_field_problems_name_their_key():
    probs = problems("""
        queue: {pools: {cpu: {concurrency: 4}}}
        routes:
          - {path: /v1/a, pool: gpu}
    """)
    assert probs == ["routes.0.pool (line 3): 'gpu' is not one of ['cpu', 'default']"] or \
        probs[0].startswith("routes.0.pool")


@pytest.mark.parametrize("text, key", [
    ("queue: {levels: {urgent: {timeout_s: 1}}}", "queue.levels.urgent"),
    ("routes: [{path: v1, priority: high}]", "routes.0.path"),
    ("routes: [{path: /v1, methods: [FETCH]}]", "routes.0.methods"),
    ("gpu: {thresholds: {soft: 0.9, hard: 0.8, critical: 0.99}}", "gpu.thresholds"),
    ("breaker: {failure_rate: 1.5}", "breaker.failure_rate"),
    ("breaker: {window: 3, min_calls: 5}", "breaker"),
    ("worker: {health: {path: healthz}}", "worker.health.path"),
    ("logging: {format: xml}", "logging.format"),
    ("gpu: {actions: {soft: {shed_below: urgent}}}", "gpu.actions.soft.shed_below"),
    ("queue: {priorities: [a, a]}", "queue.priorities"),
])
def test_bad_values_are_named(text, key):
    probs = problems(text)
    assert any(p.startswith(key) for p in probs), probs


def test_broken_yaml_says_where():
    probs = problems("listen: {host: 127.0.0.1\nworker: [\n")
    assert len(probs) == 1 and probs[0].startswith("invalid YAML (line")


def test_top_level_must_be_mapping():
    assert "top level must be a mapping" in problems("- a\n- b\n")[0]


def test_route_matching_uses_prefix_and_methods():
    s = cfg.parse("""
routes:
  - {path: /v1/embeddings, priority: high}
  - {path: /v1/completions, methods: [post], timeout_s: 5}
""")
    assert s.route_for("POST", "/v1/embeddings/x").priority == "high"
    assert s.route_for("POST", "/v1/completions").timeout_s == 5
    assert s.route_for("GET", "/v1/completions") is None
    assert s.route_for("GET", "/other") is None


def test_settings_are_immutable():
    s = cfg.parse("")
    with pytest.raises(ValidationError, match="frozen"):
        s.listen.port = 1  # type: ignore[misc]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, timeout=60)


def test_check_config_good_file_prints_effective_config(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("queue: {concurrency: 3}\n")
    r = run_cli("check-config", str(f))
    assert r.returncode == 0, r.stderr
    body = yaml.safe_load(r.stdout)
    assert body["queue"]["concurrency"] == 3
    assert body["worker"]["health"]["path"] == "/healthz"  # defaults filled in


def test_check_config_bad_file_exits_1_listing_problems(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("queue:\n  concurrency: 0\n  nope: 1\n")
    r = run_cli("check-config", str(f))
    assert r.returncode == 1
    assert "2 problem(s)" in r.stderr
    assert "queue.concurrency (line 2)" in r.stderr and "queue.nope (line 3): unknown key" in r.stderr


def test_check_config_missing_file(tmp_path):
    r = run_cli("check-config", str(tmp_path / "absent.yaml"))
    assert r.returncode == 1 and "cannot read file" in r.stderr


def test_run_without_config_is_refused():
    import os
    env = {k: v for k, v in os.environ.items() if k != "GPU_SUPERVISOR_CONFIG"}
    r = subprocess.run([sys.executable, "-m", "supervisor", "run"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "GPU_SUPERVISOR_CONFIG" in r.stderr


def test_shipped_configs_are_valid():
    from pathlib import Path
    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert files, "configs/ should ship example policies"
    for f in files:
        cfg.load(f)


# -- the fleet: several named workers ----------------------------------------------------------

def test_single_worker_form_is_a_fleet_of_one_named_default():
    s = cfg.parse("worker: {command: [x, '{socket}'], stop_grace_s: 3}")
    assert list(s.fleet) == ["default"] and s.fleet["default"].stop_grace_s == 3
    assert s.fleet["default"].placements() == (None,)


def test_workers_inherit_worker_defaults_and_keep_their_own_keys():
    s = cfg.parse("""
        worker_defaults: {stop_grace_s: 2, health: {interval_s: 0.5}}
        workers:
          chat: {command: [a], gpus: [0, 2], health: {timeout_s: 1}}
          embed: {command: [b], replicas: 3, stop_grace_s: 7, start: on_demand}
    """.replace("\n        ", "\n"))
    chat, embed = s.fleet["chat"], s.fleet["embed"]
    assert chat.stop_grace_s == 2 and chat.health.interval_s == 0.5 and chat.health.timeout_s == 1
    assert chat.placements() == (0, 2)
    assert embed.stop_grace_s == 7 and embed.placements() == (None, None, None) and embed.start == "on_demand"
    assert s.first_worker is chat


def test_fleet_problems_are_named_by_key_path():
    assert problems("""
        workers:
          chat: {command: [a], gpus: [0], replicas: 2}
    """) == ["workers.chat.replicas (line 3): cannot be set together with gpus (gpus gives one replica per GPU)"]
    assert problems("""
        workers:
          a: {command: [a], models: [m1, shared]}
          b: {command: [b], models: [shared]}
    """)[0].startswith("workers.b.models (line 4): model 'shared' is already served by worker 'a'")
    probs = problems("""
        workers:
          a: {command: [a]}
        routes:
          - {path: /v1/, worker: nope}
    """)
    assert probs[0].startswith("routes.0.worker (line 5): 'nope' is not one of the workers ['a']")
    assert problems("""
        worker: {command: [a]}
        workers: {b: {command: [b]}}
    """)[0].startswith("worker (line 2): use either")
    assert "workers.chat.gpus" in problems("workers: {chat: {command: [a], gpus: [1, 1]}}")[0]
    assert "workers.bad name" in problems("workers: {'bad name': {command: [a]}}")[0]


def test_a_need_larger_than_the_gpu_budget_is_refused_by_check_config():
    probs = problems("""
        workers:
          chat: {command: [a], gpus: [0], gpu_memory_mb: 20000}
        gpu: {budget_mb: {0: 16000}, reserve_mb: 1000}
    """)
    assert probs[0].startswith("workers.chat.gpu_memory_mb")
    assert "15000 MiB" in probs[0]
    cfg.parse("""
workers:
  chat: {command: [a], gpus: [0], gpu_memory_mb: 14000}
gpu: {budget_mb: {0: 16000}, reserve_mb: 1000}
""")
