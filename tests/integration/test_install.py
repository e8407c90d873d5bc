"""systemd/install.sh staged into a DESTDIR: files land where a sysadmin expects them,
with sane modes, nothing outside DESTDIR is touched, and no key is ever written."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "systemd" / "install.sh"

EXPECTED = {
    "etc/systemd/system/batchd.service": REPO / "systemd" / "batchd.service",
    "etc/systemd/system/batchd@.service": REPO / "systemd" / "batchd@.service",
    "usr/lib/sysusers.d/batchd.conf": REPO / "systemd" / "batchd.sysusers",
    "usr/lib/tmpfiles.d/batchd.conf": REPO / "systemd" / "batchd.tmpfiles",
    "etc/batchd/batchd.toml": REPO / "config" / "batchd.toml",
    "etc/batchd/batchd.toml.example": REPO / "config" / "batchd.toml",
    "opt/batchd/README.md": REPO / "README.md",
    **{f"opt/batchd/docs/{page.name}": page for page in sorted((REPO / "docs").glob("*.md"))},
}
SYSTEM_TOOLS = ("systemctl", "systemd-sysusers", "systemd-tmpfiles")


def install(
    destdir: Path, *args: str, tmp_path: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run install.sh with fake systemctl/sysusers/tmpfiles on PATH that log any call."""
    fakes = tmp_path / "fakebin"
    fakes.mkdir(exist_ok=True)
    for tool in SYSTEM_TOOLS:
        fake = fakes / tool
        fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/system-calls"\n')
        fake.chmod(0o755)
    env = {
        "PATH": f"{fakes}:/usr/bin:/bin",
        "DESTDIR": str(destdir),
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        ["sh", str(SCRIPT), "--no-venv", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_land_where_expected_with_sane_modes(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    result = install(dest, tmp_path=tmp_path)
    for rel, source in EXPECTED.items():
        path = dest / rel
        assert path.read_bytes() == source.read_bytes(), rel
        assert mode(path) == 0o644, rel
    for folder in ("etc/batchd", "etc/systemd/system", "usr/lib/sysusers.d", "opt/batchd"):
        assert mode(dest / folder) == 0o755, folder
    assert "/etc/batchd/api_key" in result.stdout  # tells where the key goes
    # Operators find `batchd` on PATH: a link to the venv's (dangling here: --no-venv).
    link = dest / "usr/local/bin/batchd"
    assert link.is_symlink() and os.readlink(link) == "/opt/batchd/venv/bin/batchd"


def test_touches_nothing_outside_destdir_and_writes_no_key(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    install(dest, "--instance", "intl", tmp_path=tmp_path)
    assert not (tmp_path / "system-calls").exists(), (tmp_path / "system-calls").read_text()
    assert not list(dest.rglob("*api_key*"))
    assert not (dest / "opt/batchd/venv").exists()  # --no-venv


def test_an_existing_configuration_is_never_overwritten(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    install(dest, "--instance", "intl", tmp_path=tmp_path)
    mine = b'provider = "dashscope-intl"\n'
    (dest / "etc/batchd/batchd.toml").write_bytes(mine)
    (dest / "etc/batchd/intl.toml").write_bytes(mine)
    result = install(dest, "--instance", "intl", tmp_path=tmp_path)
    assert (dest / "etc/batchd/batchd.toml").read_bytes() == mine
    assert (dest / "etc/batchd/intl.toml").read_bytes() == mine
    assert "kept existing /etc/batchd/batchd.toml" in result.stdout


def test_an_instance_gets_its_config_and_folders(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    install(dest, "--instance", "intl", "--instance=cn", tmp_path=tmp_path)
    for name in ("intl", "cn"):
        assert (dest / f"etc/batchd/{name}.toml").is_file()
        conf = dest / f"etc/tmpfiles.d/batchd-{name}.conf"
        assert mode(conf) == 0o644
        lines = [line.split() for line in conf.read_text().splitlines() if line[:1] == "d"]
        by_path = {fields[1]: fields[2:5] for fields in lines}
        root = f"/var/lib/batchd/{name}"
        assert by_path[f"{root}/inbox"] == ["3770", "batchd", "batchd"]
        assert by_path[f"{root}/outbox"] == ["2750", "batchd", "batchd"]
        assert by_path[f"{root}/state"] == ["0700", "batchd", "batchd-operators"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "-x", "", "eu west"])
def test_an_unsafe_instance_name_is_refused(name: str, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    result = install(dest, "--instance", name, tmp_path=tmp_path, check=False)
    assert result.returncode == 2
    assert "instance name" in result.stderr
    assert not dest.exists()


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="systemd-tmpfiles needs root to chown the staged folders to their users",
)
@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles are not installed (apt-get install systemd)",
)
def test_sysusers_and_tmpfiles_build_the_shared_folders(tmp_path: Path) -> None:
    """Applied to the staged root: the user and groups exist, and the folders have the
    modes and groups that let users drop files and operators use the socket."""
    dest = tmp_path / "root"
    install(dest, tmp_path=tmp_path)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (dest / "etc" / name).touch()
    for cmd in (
        ["systemd-sysusers", f"--root={dest}", "batchd.conf"],
        ["systemd-tmpfiles", f"--root={dest}", "--create", "batchd.conf"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
    groups = {
        line.split(":")[0]: int(line.split(":")[2])
        for line in (dest / "etc/group").read_text().splitlines()
    }
    users = {
        line.split(":")[0]: line.split(":")
        for line in (dest / "etc/passwd").read_text().splitlines()
    }
    assert {"batchd", "batchd-operators"} <= set(groups)
    assert users["batchd"][6] == "/usr/sbin/nologin"
    data = dest / "var/lib/batchd"
    expected = {
        "": (0o751, "batchd-operators"),
        "inbox": (0o3770, "batchd"),
        "outbox": (0o2750, "batchd"),
        "spool": (0o700, "batchd-operators"),
        "state": (0o700, "batchd-operators"),
    }
    for rel, (want_mode, group) in expected.items():
        st = (data / rel).stat()
        assert stat.S_IMODE(st.st_mode) == want_mode, rel
        assert st.st_gid == groups[group], rel
        assert st.st_uid == int(users["batchd"][2]), rel


def test_the_venv_gets_the_tokens_extra(tmp_path: Path) -> None:
    """Issue 21: the service installed without `tokens` counted with the approximation.
    A stand-in python records what pip is asked to install into the venv."""
    fakes = tmp_path / "fakebin"
    fakes.mkdir()
    log = tmp_path / "pip-calls"
    venv_python = f'#!/bin/sh\necho "$*" >> "{log}"\n'
    (fakes / "python3").write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "-m venv" ] || exit 1\n'
        'mkdir -p "$3/bin"\n'
        f"cat > \"$3/bin/python\" <<'EOF'\n{venv_python}EOF\n"
        'printf "#!/bin/sh\\necho batchd 0\\n" > "$3/bin/batchd"\n'
        'chmod 755 "$3/bin/python" "$3/bin/batchd"\n'
    )
    (fakes / "python3").chmod(0o755)
    for tool in SYSTEM_TOOLS:
        (fakes / tool).write_text("#!/bin/sh\n")
        (fakes / tool).chmod(0o755)
    env = {
        "PATH": f"{fakes}:/usr/bin:/bin",
        "DESTDIR": str(tmp_path / "dest"),
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        ["sh", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    installs = [line for line in log.read_text().splitlines() if "pip install" in line]
    assert installs and installs[-1].endswith("[tokens,storage]"), installs
