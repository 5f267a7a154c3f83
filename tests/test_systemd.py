"""The systemd unit: what it promises (DESIGN "systemd"), and that systemd-analyze accepts it cleanly."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from supervisor.config import Settings
from tests.harness import REPO_ROOT, fast_config

UNIT = REPO_ROOT / "systemd" / "gpu-supervisor.service"
CONSOLE_SCRIPT = Path(sys.executable).with_name("gpu-supervisor")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given (systemd keys may repeat), with continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit, key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values, f"{section}.{key} is missing"
    return values[-1]


def seconds(value: str) -> float:
    """systemd time spans as used here: '60', '90s', '10min', '1min 30s'."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit]
    return total


def test_notify_protocol_and_lifecycle(unit):
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert seconds(one(unit, "WatchdogSec")) > 0
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "KillMode") == "mixed"
    assert one(unit, "ExecReload") in ("/bin/kill -HUP $MAINPID", "/usr/bin/kill -HUP $MAINPID")
    assert one(unit, "OOMPolicy") == "continue"  # a kernel OOM kill of the worker must not stop the unit


def test_stop_timeout_covers_the_drain(unit):
    defaults = Settings()
    needed = defaults.drain.timeout_s + defaults.worker.stop_grace_s
    assert seconds(one(unit, "TimeoutStopSec")) > needed
    assert seconds(one(unit, "TimeoutStartSec")) > defaults.worker.startup_timeout_s


def test_exec_start_runs_the_console_script_with_the_etc_policy(unit):
    argv = one(unit, "ExecStart").split()
    assert Path(argv[0]).name == "gpu-supervisor"
    assert argv[1:] == ["run", "--config", "/etc/gpu-supervisor/policy.yaml"]


def test_runtime_directory_and_hardening_leave_the_gpu_reachable(unit):
    assert one(unit, "RuntimeDirectory") == "gpu-supervisor"
    assert one(unit, "RuntimeDirectoryMode") == "0700"
    for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                      ("ProtectHome", "yes"), ("ProtectKernelTunables", "yes"), ("ProtectControlGroups", "yes")):
        assert one(unit, key) == want, key
    # PrivateDevices would hide /dev/nvidia*; a closed device policy must allow the NVIDIA devices
    assert unit["Service"].get("PrivateDevices", ["no"])[-1] in ("no", "false")
    if unit["Service"].get("DevicePolicy", ["auto"])[-1] != "auto":
        allowed = " ".join(unit["Service"].get("DeviceAllow", []))
        assert "char-nvidia" in allowed or "/dev/nvidia" in allowed
    # CUDA's JIT needs writable executable memory
    assert unit["Service"].get("MemoryDenyWriteExecute", ["no"])[-1] in ("no", "false")


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this venv's console script (the /usr/local one may not exist)."""
    assert CONSOLE_SCRIPT.exists(), CONSOLE_SCRIPT
    text = UNIT.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    binary = exec_start.split("=", 1)[1].split()[0]
    out = tmp_path / UNIT.name
    out.write_text(text.replace(exec_start, exec_start.replace(binary, str(CONSOLE_SCRIPT), 1)))
    return out


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path):
    path = _unit_for_this_machine(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    output = (r.stdout + r.stderr).strip()
    # verify exits 0 even for unknown keys and unparsable values: the output must be empty
    assert r.returncode == 0, output
    assert output == "", output


@needs_analyze
def test_systemd_analyze_verify_reports_only_a_missing_binary_for_the_shipped_unit():
    r = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    exec_binary = one(parse_unit(UNIT.read_text()), "ExecStart").split()[0]
    if Path(exec_binary).exists():
        assert lines == []
    else:
        assert lines and all("is not executable" in ln and exec_binary in ln for ln in lines), lines


@needs_analyze
def test_exposure_score(tmp_path: Path):
    path = _unit_for_this_machine(tmp_path)
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {(r.stdout + r.stderr)[-300:]}")
    assert float(m.group(1)) <= 4.0, r.stdout[-3000:]


def test_the_unit_runs_the_console_script(tmp_path: Path):
    """ExecStart's entry point exists and parses the unit's arguments (check-config: no daemon)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(fast_config()))
    r = subprocess.run([str(CONSOLE_SCRIPT), "check-config", str(policy)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_listen_failure_exits_non_zero_so_systemd_restarts(tmp_path: Path):
    """Restart=on-failure relies on a failed start exiting non-zero (and not hanging)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(fast_config(listen={"host": "127.0.0.1", "port": port})))
        r = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(policy)],
                           capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    assert r.returncode != 0
    assert "listen_failed" in r.stderr + r.stdout
