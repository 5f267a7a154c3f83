"""Configuration: every problem named with its key path and line; check-config's exit codes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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
          embed: {command: [b], models: [e], replicas: 3, stop_grace_s: 7, start: on_demand}
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


# -- every problem in one run ------------------------------------------------------------------

SEVERAL_PROBLEMS = """\
queue:
  concurrency: 0
  max_size: yes
  pools: {cpu: {concurrency: 4}}
workers:
  chat: {command: ["{python}", -m, model_worker], gpus: 0}
  embed: {command: ["{python}", -m, model_worker], start: on_demand}
routes:
  - {path: v1/chat, methods: [FETCH], worker: nope, priority: urgent, pool: gpu}
  - {path: /v1/embeddings, pool: cpu, timeout_s: on}
gpu:
  actions: {soft: {shed_below: urgent}}
  thresholds: {soft: 0.9, hard: 0.8, critical: 0.99, extra: 1}
breaker: {window: 3, min_calls: 5, failure_rate: 2}
logging: {level: loud}
"""


def test_one_check_config_run_reports_every_independent_problem(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text(SEVERAL_PROBLEMS)
    r = run_cli("check-config", str(f))
    assert r.returncode == 1
    expected = [
        "queue.concurrency (line 2): write a number greater than 0, not 0",
        "queue.max_size (line 3): `yes` is read by YAML as the boolean true: write a number",
        "workers.chat.gpus (line 6): write a list of GPU indexes like [0, 1], or auto",
        "workers.embed.start (line 7): an on_demand worker needs `models:`",
        "routes.0.path (line 9): must start with '/'",
        "routes.0.methods (line 9): unknown HTTP method(s) ['FETCH']",
        "routes.0.worker (line 9): 'nope' is not one of the workers ['chat', 'embed']",
        "routes.0.priority (line 9): 'urgent' is not one of",
        "routes.0.pool (line 9): 'gpu' is not one of ['cpu', 'default']",
        "routes.1.timeout_s (line 10): `on` is read by YAML as the boolean true: write a number",
        "gpu.actions.soft.shed_below (line 12): 'urgent' is not one of",
        "gpu.thresholds (line 13): thresholds must rise",
        "gpu.thresholds.extra (line 13): unknown key",
        "breaker.failure_rate (line 14): write a number of at most 1",
        "breaker (line 14): min_calls must be <= window",
        "logging.level (line 15): write 'debug', 'info', 'warning' or 'error', not 'loud'",
    ]
    lines = [line.strip() for line in r.stderr.splitlines()[1:]]
    for want in expected:
        assert sum(line.startswith(want) for line in lines) == 1, (want, r.stderr)
    assert f"{len(expected)} problem(s)" in r.stderr, r.stderr
    # said in the user's words: no union branch names, no pydantic phrasing
    for jargon in ("tuple[", "literal[", "constrained-", "Input should be"):
        assert jargon not in r.stderr


def test_duplicate_keys_are_refused_at_every_level_with_both_lines():
    probs = problems("""
        queue:
          concurrency: 2
          concurrency: 3
        workers:
          chat: {command: [a], models: [m], models: [n]}
        queue:
          timeout_s: 5
    """)
    assert any(p.startswith("queue.concurrency (line 4): duplicate key, also at line 3") for p in probs), probs
    assert any(p.startswith("workers.chat.models (line 6): duplicate key, also at line 6") for p in probs), probs
    assert any(p.startswith("queue (line 7): duplicate key, also at line 2") for p in probs), probs
    # a YAML merge key (`<<`) is not a duplicate, nor a key that overrides a merged one
    s = cfg.parse("worker_defaults: &d {stop_grace_s: 2}\nworkers:\n  chat: {<<: *d, command: [a], stop_grace_s: 3}\n")
    assert s.fleet["chat"].stop_grace_s == 3


@pytest.mark.parametrize("text, key", [
    ("queue: {max_size: yes}", "queue.max_size"),
    ("queue: {concurrency: true}", "queue.concurrency"),
    ("breaker: {failure_rate: on}", "breaker.failure_rate"),
    ("gpu: {budget_mb: {0: yes}}", "gpu.budget_mb.0"),
    ("jobs: {max_pending: on}", "jobs.max_pending"),
    ("workers: {chat: {command: [a], gpus: [yes]}}", "workers.chat.gpus.0"),
    ("worker: {env: {HF_HUB_OFFLINE: no}}", "worker.env.HF_HUB_OFFLINE"),
    ("queue: {priorities: [high, off]}", "queue.priorities.1"),
])
def test_a_yaml_boolean_is_never_taken_for_a_number_or_a_string(text, key):
    probs = problems(text)
    assert len(probs) == 1 and probs[0].startswith(f"{key} (line 1): `"), probs
    assert "is read by YAML as the boolean" in probs[0]


def test_booleans_stay_welcome_where_a_boolean_is_due():
    s = cfg.parse("workers: {chat: {command: [a], pinned: yes}}\ngpu: {enabled: no}\n"
                  "routes: [{path: /v1, retry: on}]\nworker_defaults: {}\n")
    assert s.fleet["chat"].pinned is True and s.gpu.enabled is False and s.routes[0].retry is True


def test_union_problems_say_what_to_write_with_the_users_key_path():
    assert problems("workers: {chat: {command: [a], gpus: 0}}") == [
        "workers.chat.gpus (line 1): write a list of GPU indexes like [0, 1], or auto"]
    # a branch that got into the value speaks for it: the bad index, not "should be auto"
    assert problems("workers: {chat: {command: [a], gpus: [-1]}}") == [
        "workers.chat.gpus.0 (line 1): write a number of at least 0, not -1"]
    assert problems("worker: {command: uvicorn}") == [
        'worker.command (line 1): write the program and its arguments as a list, like '
        '[uvicorn, app:app, --uds, "{socket}"]']


# -- an on-demand worker must be reachable -----------------------------------------------------

def test_an_on_demand_worker_no_request_can_reach_is_refused():
    probs = problems("""
        workers:
          chat: {command: [a]}
          embed: {command: [b], start: on_demand}
    """)
    assert probs == ["workers.embed.start (line 4): an on_demand worker needs `models:` (the names it serves) "
                     "or a route with `worker: embed`, since it is started only by a request routed to it"]


@pytest.mark.parametrize("text", [
    # its names are declared
    "workers:\n  chat: {command: [a]}\n  embed: {command: [b], start: on_demand, models: [minilm]}\n",
    # a route names it
    "workers:\n  chat: {command: [a]}\n  embed: {command: [b], start: on_demand}\n"
    "routes: [{path: /v1/embeddings, worker: embed}]\n",
    # the first worker: requests that name nothing go there
    "workers:\n  embed: {command: [b], start: on_demand}\n  chat: {command: [a]}\n",
    "worker: {command: [b], start: on_demand}\n",
])
def test_an_on_demand_worker_a_request_can_reach_is_fine(text):
    cfg.parse(text)


# -- the worker's program ----------------------------------------------------------------------

def test_check_config_refuses_a_missing_program_naming_it_and_where_it_looked(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text('workers:\n  chat: {command: [gs-no-such-server, --uds, "{socket}"]}\n'
                 '  tool: {command: [./serve.sh], cwd: ' + str(tmp_path) + '}\n')
    r = run_cli("check-config", str(f))
    assert r.returncode == 1
    assert "workers.chat.command (line 2): program 'gs-no-such-server' not found on PATH (" in r.stderr
    assert f"nor in {Path(sys.executable).parent}" in r.stderr
    assert f"workers.tool.command (line 3): program './serve.sh' not found (looked for {tmp_path}/serve.sh)" \
        in r.stderr
    (tmp_path / "serve.sh").write_text("#!/bin/sh\n")
    (tmp_path / "serve.sh").chmod(0o755)
    f.write_text('workers:\n  chat: {command: ["{python}", -m, x]}\n  tool: {command: [./serve.sh], cwd: '
                 + str(tmp_path) + '}\n')
    r = run_cli("check-config", str(f))
    assert r.returncode == 0, r.stderr


def test_check_config_finds_a_program_in_the_daemons_own_environment(tmp_path):
    """As under systemd: the console script by its full venv path, PATH without the venv's bin."""
    f = tmp_path / "policy.yaml"
    f.write_text('worker: {command: [uvicorn, app:app, --uds, "{socket}"]}\n')
    assert shutil.which("uvicorn", path="/usr/bin:/bin") is None
    r = subprocess.run([str(Path(sys.executable).with_name("gpu-supervisor")), "check-config", str(f)],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


# -- a closed stdout ---------------------------------------------------------------------------

def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI with its stdout a pipe whose reader is already gone (`... | head` that exited)."""
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        return subprocess.run([sys.executable, "-m", "supervisor", *args], stdout=w_fd, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(w_fd)


@pytest.mark.parametrize("args", [("check-config", str(Path(__file__).parents[1] / "configs" / "example.yaml")),
                                  ("schema",)])
def test_a_printing_command_ends_quietly_when_its_reader_is_gone(args):
    r = run_into_closed_pipe(*args)
    assert r.stderr == ""
    assert r.returncode == 128 + signal.SIGPIPE


def test_every_policy_snippet_in_the_readme_is_valid():
    """The README's YAML blocks are what users paste first: each one must load as printed."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert len(blocks) >= 5, "the README shows policies as ```yaml blocks"
    for text in blocks:
        try:
            cfg.parse(text, "README.md")
        except cfg.ConfigError as exc:
            raise AssertionError(f"README snippet does not load:\n{text}\n{exc.problems}") from None


def test_the_readme_bad_file_example_is_what_check_config_prints(tmp_path):
    """The README shows a bad policy and check-config's answer: the answer is the real one."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    m = re.search(r"This\nfile \(`policy.yaml`\):\n\n```\n(.*?)```\n\ngets, in one run:\n\n```\n(.*?)```", readme, re.S)
    assert m, "the README's check-config example"
    policy, printed = m.group(1), m.group(2).splitlines()
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    r = subprocess.run([sys.executable, "-m", "supervisor", "check-config", str(path)], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
    got = r.stderr.splitlines()
    assert r.returncode == 1 and got[0] == f"{path}: {printed[0].split(': ', 1)[1]}", r.stderr
    assert len(got) == len(printed), r.stderr
    for want, line in zip(printed[1:], got[1:]):
        if "not found on PATH" in want:  # where it looked depends on the machine
            want, line = want.split(" nor in ")[0], line.split(" nor in ")[0]
        assert line == want
