"""`gpu-supervisor schema`: a valid JSON Schema that accepts every shipped config and rejects bad ones."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from supervisor import config as cfg
from tests.harness import REPO_ROOT, fast_config

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def schema() -> dict:
    """The schema as the real CLI prints it."""
    out = subprocess.run([sys.executable, "-m", "supervisor", "schema"], cwd=str(REPO_ROOT), capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def validator(schema) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


def as_json(data: dict) -> dict:
    """What an editor or CI linter validates: the YAML's data with JSON's types (mapping keys are strings)."""
    return json.loads(json.dumps(data))


def errors(validator, data: dict) -> list[str]:
    """`key.path: message` for each error, the branches of an anyOf (a nullable section) included."""
    out = []
    stack = list(validator.iter_errors(as_json(data)))
    while stack:
        e = stack.pop()
        out.append(f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
        stack.extend(e.context or ())
    return out


def test_is_a_valid_draft_2020_12_schema(schema):
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    for key in ("listen", "queue", "breaker", "gpu", "admin", "routes"):
        assert key in schema["properties"], key


def test_settings_are_described(schema):
    """Every key of the config's own models says what it does (from configs/example.yaml's comments)."""
    top = [k for k, p in schema["properties"].items() if not p.get("description")]
    assert top == []
    own = {name: d for name, d in schema["$defs"].items() if d.get("properties")}
    for name in ("Queue", "Breaker", "Gpu", "Admin", "Limits", "Route", "Health"):
        missing = [k for k, p in own[name]["properties"].items() if not p.get("description")]
        assert missing == [], (name, missing)
    assert "429 queue_full" in own["Queue"]["properties"]["max_size"]["description"]


def test_configs_found():
    assert len(CONFIGS) >= 2, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(validator, path):
    data = yaml.safe_load(path.read_text())
    assert errors(validator, data) == []
    cfg.load(path)  # and the daemon agrees


def test_test_policy_validates(validator):
    assert errors(validator, fast_config(admin={"listen": {"host": "127.0.0.1", "port": 0}})) == []


@pytest.mark.parametrize("change,where", [
    ({"colour": "blue"}, ""),
    ({"queue": {"concurency": 2}}, "queue"),
    ({"breaker": {"window": 20, "windw": 5}}, "breaker"),
    ({"routes": [{"path": "/v1/", "prio": "high"}]}, "routes.0"),
    ({"admin": {"listen": {"host": "127.0.0.1", "port": 1, "tls": True}}}, "admin.listen"),
])
def test_unknown_keys_fail(validator, change, where):
    errs = errors(validator, {**fast_config(), **change})
    assert errs, change
    assert any(e.startswith(where + ":") and "Additional properties" in e for e in errs), errs
    with pytest.raises(cfg.ConfigError):
        cfg.parse(yaml.safe_dump({**fast_config(), **change}))


@pytest.mark.parametrize("change,where", [
    ({"queue": {"concurrency": "many"}}, "queue.concurrency"),
    ({"queue": {"concurrency": 0}}, "queue.concurrency"),
    ({"listen": {"host": "127.0.0.1", "port": 70000}}, "listen.port"),
    ({"breaker": {"failure_rate": 1.5}}, "breaker.failure_rate"),
    ({"gpu": {"enabled": "sometimes"}}, "gpu.enabled"),
    ({"logging": {"format": "xml"}}, "logging.format"),
    ({"routes": {"path": "/v1/"}}, "routes"),
    ({"retry": {"methods": "GET"}}, "retry.methods"),
])
def test_wrong_types_and_ranges_fail(validator, change, where):
    data = {**fast_config(), **change}
    errs = errors(validator, data)
    assert any(e.startswith(where + ":") for e in errs), errs
    with pytest.raises(cfg.ConfigError):
        cfg.parse(yaml.safe_dump(data))
