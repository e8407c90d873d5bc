"""The shipped systemd units: systemd-analyze verifies them and scores them "OK" or better.

`systemd-analyze verify` and `systemd-analyze security --offline=true` work without a
running systemd. `verify` insists that ExecStart's binary exists, and the real one
(/opt/batchd/venv/bin/batchd) only does after `make install`, so each unit is checked as
a copy whose ExecStart points at a stub; nothing else in it changes. `verify` exits 0 on
many errors (unknown keys, bad values are "ignored"), so its stderr must be empty too.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from batchd.config import Settings
from batchd.daemon import Daemon

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
EXEC = "/opt/batchd/venv/bin/batchd"
# Each shipped unit and the name it is checked under (a template through an instance).
UNITS = {"batchd.service": "batchd.service", "batchd@.service": "batchd@test.service"}
OK_LEVELS = ("PERFECT", "SAFE", "OK")

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)


def unit_copy(tmp_path: Path, unit: str) -> Path:
    """The unit under its checked name, ExecStart pointing at an executable stub."""
    stub = tmp_path / "batchd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (SYSTEMD / unit).read_text()
    assert EXEC in text, f"{unit} does not run {EXEC}"
    target = tmp_path / UNITS[unit]
    target.write_text(text.replace(EXEC, str(stub)))
    return target


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
        check=False,
    )


def directives(unit: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, values in order (a key may repeat)."""
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_every_shipped_unit_is_checked() -> None:
    shipped = {p.name for p in SYSTEMD.glob("*.service")}
    assert shipped == set(UNITS)


@needs_analyze
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_verifies_without_a_single_complaint(unit: str, tmp_path: Path) -> None:
    copy = unit_copy(tmp_path, unit)
    result = analyze("verify", "--man=no", str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@needs_analyze
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_exposure_is_ok_or_better(unit: str, tmp_path: Path) -> None:
    copy = unit_copy(tmp_path, unit)
    result = analyze("security", "--offline=true", "--no-pager", str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout
    exposure, level = float(match[1]), match[2]
    assert exposure <= 2.0, result.stdout
    assert level in OK_LEVELS, result.stdout


@needs_analyze
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: an unknown key exits 0 but speaks on stderr."""
    copy = unit_copy(tmp_path, "batchd.service")
    copy.write_text(copy.read_text().replace("UMask=0027", "UMask=0027\nProtectSytem=strict"))
    result = analyze("verify", "--man=no", str(copy), cwd=tmp_path)
    assert "ProtectSytem" in result.stderr


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_runs_the_daemon_the_way_systemd_expects(unit: str) -> None:
    d = directives(unit)
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["on-failure"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["ExecStart"][0].startswith(f"{EXEC} run --config /etc/batchd/")
    assert seconds(d["WatchdogSec"][0]) >= 10
    grace_s = inspect.signature(Daemon._stop_tasks).parameters["grace_s"].default
    assert seconds(d["TimeoutStopSec"][0]) >= 2 * grace_s, "stop timeout shorter than the drain"
    assert d["LoadCredential"][0].startswith("api_key:/etc/batchd/")
    assert d["CapabilityBoundingSet"] == ["CAP_LEASE"]  # and nothing else
    assert d["ProtectSystem"] == ["strict"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert d["SystemCallFilter"][0] == "@system-service"


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_paths_agree_with_the_daemon_settings(
    unit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment the unit sets puts data in the StateDirectory, the control socket
    in the RuntimeDirectory, and makes that data root writable under ProtectSystem."""
    d = directives(unit)
    instance = "test" if "@" in unit else ""
    env = dict(v.replace("%i", instance).split("=", 1) for v in d["Environment"])
    state = d["StateDirectory"][0].replace("%i", instance)
    runtime = d["RuntimeDirectory"][0].replace("%i", instance)
    assert env["BATCHD_PATHS__ROOT"] == f"/var/lib/{state}"
    assert env["BATCHD_PATHS__RUNTIME"] == f"/run/{runtime}"
    assert [p.replace("%i", instance) for p in d["ReadWritePaths"]] == [f"/var/lib/{state}"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.load(None)
    assert settings.paths.root == Path(f"/var/lib/{state}")
    assert settings.socket_path == Path(f"/run/{runtime}/control.sock")
    assert settings.control.group == "batchd-operators"
