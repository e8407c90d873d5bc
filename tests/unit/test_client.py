"""The light client: where it finds the socket (as the daemon would place it), what it
says when nobody answers, and that client commands load nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

from batchd.client import Client, RequestFailed, Unreachable, socket_path
from batchd.config import Settings
from batchd.errors import ConfigError


def _settings_socket(config: Path | None, root: Path | None) -> Path:
    settings = Settings.load(config)
    if root is not None:
        paths = settings.paths.model_copy(update={"root": root})
        settings = settings.model_copy(update={"paths": paths})
    return settings.socket_path


@pytest.mark.parametrize(
    ("toml_keys", "env_keys", "with_root"),
    list(
        product(
            [(), ("root",), ("root", "runtime"), ("socket",), ("runtime", "socket")],
            [(), ("root",), ("runtime",), ("socket",)],
            [False, True],
        )
    ),
)
def test_the_socket_is_found_where_the_daemon_puts_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toml_keys: tuple[str, ...],
    env_keys: tuple[str, ...],
    with_root: bool,
) -> None:
    for name in list(os.environ):
        if name.upper().startswith("BATCHD_"):
            monkeypatch.delenv(name)
    lines = []
    if "root" in toml_keys or "runtime" in toml_keys:
        lines.append("[paths]")
        if "root" in toml_keys:
            lines.append(f'root = "{tmp_path / "toml-root"}"')
        if "runtime" in toml_keys:
            lines.append(f'runtime = "{tmp_path / "toml-run"}"')
    if "socket" in toml_keys:
        lines += ["[control]", f'socket = "{tmp_path / "toml.sock"}"']
    config = tmp_path / "batchd.toml"
    config.write_text("\n".join(lines) + "\n")
    env = {
        "root": ("BATCHD_PATHS__ROOT", tmp_path / "env-root"),
        "runtime": ("BATCHD_PATHS__RUNTIME", tmp_path / "env-run"),
        "socket": ("BATCHD_CONTROL__SOCKET", tmp_path / "env.sock"),
    }
    for key in env_keys:
        monkeypatch.setenv(env[key][0], str(env[key][1]))
    root = tmp_path / "cli-root" if with_root else None
    expected = _settings_socket(config, root)
    assert socket_path(root=root, config=config) == expected
    assert Client(root=root, config=config).path == expected


def test_an_explicit_socket_wins_and_the_default_is_the_packaged_root() -> None:
    assert socket_path(socket="/x/y.sock", root="/r") == Path("/x/y.sock")
    assert socket_path(environ={}) == Path("/var/lib/batchd/control.sock")
    assert socket_path(environ={}) == Settings().socket_path


def test_a_mistake_elsewhere_in_the_configuration_does_not_hide_the_socket(
    tmp_path: Path,
) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text(f'[jobs]\nsplitt = true\n[paths]\nroot = "{tmp_path}"\n')
    env = {"BATCHD_POLL__FIRST_POLL_S": "soon"}
    with pytest.raises(ConfigError):
        Settings.load(config)
    assert socket_path(config=config, environ=env) == tmp_path / "control.sock"


def test_an_unreadable_configuration_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        socket_path(config=tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[paths\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        socket_path(config=bad, environ={})
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[paths]\nroot = 3\n")
    with pytest.raises(ConfigError, match=r"paths\.root"):
        socket_path(config=wrong, environ={})


def test_no_daemon_is_unreachable_naming_the_socket(tmp_path: Path) -> None:
    client = Client(tmp_path / "none.sock")
    with pytest.raises(Unreachable, match=r"none\.sock"):
        client.status()
    with pytest.raises(Unreachable, match=r"none\.sock"):
        list(client.events(seconds=0.1))


def test_a_socket_that_answers_nonsense_is_a_failed_request(tmp_path: Path) -> None:
    """Something else on the path (not batchd, or a broken answer) is named as such."""
    import socket
    import threading

    path = tmp_path / "other.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        body = b"not json"
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        conn.close()

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with pytest.raises(RequestFailed) as failed:
            Client(path).status()
        assert failed.value.code == "bad_answer"
    finally:
        thread.join(5)
        server.close()


HEAVY = ("aiohttp", "prometheus_client", "batchd.emulator", "pydantic", "batchd.daemon")


@pytest.mark.parametrize(
    "argv",
    [
        ["--version"],
        ["validate", "{one}"],
        ["estimate", "{one}"],
        ["estimate", "--json", "--approx", "{one}"],
        ["status", "--socket", "{sock}"],
        ["jobs", "--socket", "{sock}", "--json"],
        ["show", "--socket", "{sock}", "0123456789abcdef"],
        ["cancel", "--socket", "{sock}", "0123456789abcdef"],
    ],
)
def test_client_commands_load_nothing_heavy(tmp_path: Path, argv: list[str]) -> None:
    """`batchd status` and friends must start about as fast as Python does: no server
    side, no emulator, no metrics library, no pydantic."""
    one = tmp_path / "one.jsonl"
    one.write_bytes(
        b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions",'
        b'"body":{"model":"qwen-plus","messages":[{"role":"user","content":"hi"}]}}\n'
    )
    args = [a.format(one=one, sock=tmp_path / "none.sock") for a in argv]
    script = (
        "import json, sys\n"
        "from batchd.cli import main\n"
        "try:\n"
        f"    code = main({args!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}), file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BATCHD_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, 3), done.stderr
    loaded = [m for m in report["modules"] if m.split(".")[0] in HEAVY or m.startswith(HEAVY)]
    assert loaded == []


def test_with_nothing_configured_the_packaged_units_socket_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd the unit sets the runtime folder in its own environment, which an
    operator's shell does not have: `batchd status` with no flags still finds it."""
    import batchd.client as client

    packaged = tmp_path / "run" / "control.sock"
    monkeypatch.setattr(client, "PACKAGED_SOCKET", packaged)
    monkeypatch.setattr(client, "DEFAULT_ROOT", tmp_path / "lib")
    assert socket_path(environ={}) == tmp_path / "lib" / "control.sock"  # nothing there yet
    packaged.parent.mkdir()
    packaged.touch()
    assert socket_path(environ={}) == packaged
    # Anything configured wins, as it does for the daemon.
    assert socket_path(environ={"BATCHD_PATHS__ROOT": "/x"}) == Path("/x/control.sock")
    assert socket_path(root=tmp_path / "r", environ={}) == tmp_path / "r" / "control.sock"
