"""Whatever a policy file holds, `parse` either gives Settings or a ConfigError whose every problem is a
line of text (what check-config prints and a reload logs), never another exception: random text, and the
shipped configs with their values swapped for values of every type, keys dropped, keys added."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import config as cfg

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
SHIPPED = [yaml.safe_load(p.read_text()) for p in CONFIGS]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1e309", "nan", "inf", "yes", "on", "~", "{socket}", "/", "a b", "x" * 300,
                     "header:Authorization", "ip", "redis://127.0.0.1:1/0", "sqlite:///nowhere/x.db"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)


def paths(doc, prefix=()):
    """Every key path of a document (into dicts and lists)."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*prefix, k)
            yield from paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield (*prefix, i)
            yield from paths(v, (*prefix, i))


def parent_of(doc, path):
    for k in path[:-1]:
        doc = doc[k]
    return doc


def parses_or_says_why(text: str) -> None:
    try:
        s = cfg.parse(text)
    except cfg.ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems), exc.problems
        return
    assert isinstance(s, cfg.Settings)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_any_text_parses_or_gets_a_config_error(text):
    parses_or_says_why(text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SHIPPED))), st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(
    ["set", "drop", "add"]), values, st.text(max_size=10)), min_size=1, max_size=4))
def test_a_shipped_config_with_values_changed_parses_or_gets_a_config_error(which, edits):
    doc = copy.deepcopy(SHIPPED[which])
    for pick, action, value, new_key in edits:
        ps = list(paths(doc))
        if not ps:
            break
        path = ps[pick % len(ps)]
        parent = parent_of(doc, path)
        key = path[-1]
        if action == "set":
            parent[key] = value
        elif action == "drop":
            del parent[key]
        elif isinstance(parent, dict):
            parent[new_key] = value
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    parses_or_says_why(text)


def test_the_shipped_configs_parse():
    assert CONFIGS
    for p in CONFIGS:
        assert isinstance(cfg.parse(p.read_text(), str(p)), cfg.Settings), p


def test_non_finite_numbers_are_refused_where_a_duration_is_due():
    for bad in (math.inf, math.nan, -1.0):
        try:
            cfg.parse(yaml.safe_dump({"queue": {"timeout_s": bad}}))
        except cfg.ConfigError as exc:
            assert any("queue.timeout_s" in p for p in exc.problems), exc.problems
        else:
            raise AssertionError(f"queue.timeout_s: {bad} was accepted")
