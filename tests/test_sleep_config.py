"""The `sleep:` keys of a worker and `gpu.host_reserve_mb`: defaults, bad values named by key path and line,
and which changes restart a replica."""

from __future__ import annotations

import textwrap

import pytest

from supervisor import config as cfg


def problems(text: str) -> list[str]:
    with pytest.raises(cfg.ConfigError) as ei:
        cfg.parse(textwrap.dedent(text))
    return ei.value.problems


def test_defaults_are_vllms_endpoints() -> None:
    s = cfg.parse("workers: {chat: {command: [a], sleep: {}}}")
    sl = s.fleet["chat"].sleep
    assert sl is not None
    assert (sl.sleep, sl.wake, sl.is_sleeping) == ("POST /sleep?level=1", "POST /wake_up", "GET /is_sleeping")
    assert (sl.gpu_memory_mb, sl.host_memory_mb, sl.after_idle_s) == (0, 0, 0.0)
    assert s.gpu.host_reserve_mb == 2048
    assert cfg.parse("workers: {chat: {command: [a]}}").fleet["chat"].sleep is None


def test_a_sleeping_worker_defaults_to_a_short_min_resident_s() -> None:
    s = cfg.parse("""
        workers:
          chat: {command: [a], sleep: {}}
          embed: {command: [a]}
          tuned: {command: [a], sleep: {}, min_resident_s: 7}
    """)
    assert s.fleet["chat"].min_resident_s == cfg.SLEEP_MIN_RESIDENT_S < s.fleet["embed"].min_resident_s == 5.0
    assert s.fleet["tuned"].min_resident_s == 7.0  # a value set is kept


def test_bad_sleep_keys_are_named_with_their_key_path_and_line() -> None:
    probs = problems("""
        workers:
          chat:
            command: [a]
            gpu_memory_mb: 100
            sleep: {sleep: "sleep please", wake: "POST wake_up", gpu_memory_mb: 100, after_idle_s: -1, levl: 2}
    """)
    text = "\n".join(probs)
    assert "workers.chat.sleep.sleep (line 6)" in text and "'METHOD /path?query'" in text
    assert "workers.chat.sleep.wake (line 6)" in text
    assert "workers.chat.sleep.after_idle_s (line 6)" in text
    assert "workers.chat.sleep.levl (line 6)" in text
    assert "workers.chat.sleep.gpu_memory_mb (line 6): 100 MiB asleep is not less than gpu_memory_mb" in text
    assert "gpu.host_reserve_mb" in problems("gpu: {host_reserve_mb: -1}")[0]


def test_only_process_settings_restart_a_replica_not_sleep_keys() -> None:
    a = cfg.parse("workers: {chat: {command: [a], sleep: {after_idle_s: 5}}}").fleet["chat"]
    b = cfg.parse("workers: {chat: {command: [a], sleep: {after_idle_s: 60, gpu_memory_mb: 10}}}").fleet["chat"]
    c = cfg.parse("workers: {chat: {command: [a]}}").fleet["chat"]
    assert a.lifecycle() == b.lifecycle() == c.lifecycle()
