"""Configuration: the shipped file, precedence, the API key's sources, clear errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from batchd.cli import main
from batchd.config import Settings
from batchd.daemon import load_api_key
from batchd.emulator.config import EmulatorSettings
from batchd.errors import ConfigError

SHIPPED = Path(__file__).parents[2] / "config" / "batchd.toml"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation: Any = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_the_shipped_config_loads_and_documents_every_key() -> None:
    settings = Settings.load(SHIPPED)
    assert settings.provider == "dashscope"
    assert EmulatorSettings.load(SHIPPED).port == 8765
    text = SHIPPED.read_text()
    for key in _keys(Settings):
        variable = "BATCHD_" + key.upper().replace(".", "__")
        assert variable in text, f"{key} ({variable}) is not documented in {SHIPPED.name}"


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[jobs]\ncompletion_window = "48h"\n[poll]\ninterval_s = 30\n')
    monkeypatch.setenv("BATCHD_POLL__INTERVAL_S", "5")
    settings = Settings.load(config)
    assert settings.jobs.completion_window == "48h"
    assert settings.poll.interval_s == 5


def test_limits_override_the_profile_per_key_and_per_model(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        "[limits]\nrunning_batches = 10\n[limits.models.batch-test-model]\nmax_running = 1\n"
    )
    limits = Settings.load(config).profile.limits
    assert limits.running_batches == 10 and limits.list_per_minute == 100
    test_model = limits.for_model("batch-test-model")
    assert test_model.max_running == 1 and test_model.max_requests_per_file == 100


def test_an_api_key_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('api_key = "sk-oops"\n')
    with pytest.raises(ConfigError, match="never read from the configuration file"):
        Settings.load(config)


def test_bad_values_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[poll]\ninterval_s = -1\n")
    with pytest.raises(ConfigError, match=r"poll\.interval_s"):
        Settings.load(config)
    config.write_text("provider = 'nowhere'\n")
    with pytest.raises(ConfigError, match="provider"):
        Settings.load(config)
    config.write_text("[jobs\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(config)


def test_api_key_sources_in_order(tmp_path: Path) -> None:
    assert load_api_key({"BATCHD_API_KEY": "a", "DASHSCOPE_API_KEY": "b"}) == "a"
    assert load_api_key({"DASHSCOPE_API_KEY": "b"}) == "b"
    (tmp_path / "api_key").write_text("sk-from-credential\n")
    assert load_api_key({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "sk-from-credential"
    with pytest.raises(ConfigError, match="no API key"):
        load_api_key({})


def test_run_without_a_key_fails_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("BATCHD_API_KEY", "DASHSCOPE_API_KEY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "--root", str(tmp_path)]) == 2
    assert "no API key" in capsys.readouterr().err


def test_emulator_limits_from_a_table_or_one_json_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulator's `[emulator.limits]` is a whole table; the benchmarks and the harness
    set it as one JSON variable. Both are checked, and a bad value names its key."""
    from batchd.emulator import EmulatorSettings

    config = tmp_path / "emulator.toml"
    config.write_text("[emulator.limits]\nrunning_batches = 7\n")
    assert EmulatorSettings.load(config).limits.running_batches == 7
    monkeypatch.setenv("BATCHD_EMULATOR_LIMITS", '{"running_batches": 5, "list_per_minute": 9}')
    limits = EmulatorSettings.load(None).limits
    assert (limits.running_batches, limits.list_per_minute) == (5, 9)
    assert limits.max_requests_per_file == 50_000  # the rest: defaults
    monkeypatch.setenv("BATCHD_EMULATOR_LIMITS", '{"running_batches": 0}')
    with pytest.raises(ConfigError, match="running_batches"):
        EmulatorSettings.load(None)


# In the shipped file, `# key = value` shows a default and `# e.g. key = value` an example
# of a key that has none; `[table]` (commented out or not) starts a table.
_SHOWN = re.compile(r"^# (e\.g\. )?([A-Za-z_][A-Za-z0-9_]*) = (.+)$")
_TABLE = re.compile(r"^(?:# )?\[([A-Za-z0-9_.-]+)\]\s*$")


def _shown_keys(text: str) -> list[tuple[str, str, str, bool]]:
    """(table, key, value as TOML, is an example) of every key the file shows."""
    table = ""
    found = []
    for line in text.splitlines():
        if header := _TABLE.match(line):
            table = header.group(1)
        elif shown := _SHOWN.match(line):
            found.append((table, shown.group(2), shown.group(3), bool(shown.group(1))))
    return found


def _effective(settings: Settings) -> dict[str, Any]:
    """What a configuration does: its values, with folders, the socket, the base URL and
    the limits as the daemon derives them."""
    data = settings.model_dump()
    data["paths"] = {
        name: settings.paths.folder(name)
        for name in ("inbox", "spool", "outbox", "state", "runtime")
    }
    data["control"]["socket"] = settings.socket_path
    data["base_url"] = settings.profile.base_url
    data["limits"] = settings.profile.limits
    return data


def test_the_shipped_config_shows_only_defaults_the_code_has(tmp_path: Path) -> None:
    """Uncommenting any line the file shows as a default changes nothing; a key without
    a default is shown as an example (`e.g.`) and is a key the code knows."""
    shown = _shown_keys(SHIPPED.read_text())
    assert len(shown) > 80  # the whole file was read
    defaults = _effective(Settings.load(None))
    emulator_defaults = EmulatorSettings.load(None).model_dump()
    config = tmp_path / "one.toml"
    wrong = []
    for table, key, value, example in shown:
        config.write_text((f"[{table}]\n" if table else "") + f"{key} = {value}\n")
        where = f"[{table}] {key} = {value}" if table else f"{key} = {value}"
        try:
            if table == "emulator":
                same = EmulatorSettings.load(config).model_dump() == emulator_defaults
            else:
                same = _effective(Settings.load(config)) == defaults
        except ConfigError as exc:
            wrong.append(f"{where}: not a key the code knows ({exc})")
            continue
        if not example and not same:
            wrong.append(f"{where}: shown as a default, but the code's default differs")
    assert not wrong, "\n".join(wrong)


def test_validate_without_a_configuration_judges_with_the_daemons_defaults() -> None:
    """`batchd validate` with no configuration skips loading it (for speed); the rules it
    then uses are those of the daemon with no configuration."""
    from batchd.inputs.verdict import Rules

    assert Rules.of(Settings.load(None)) == Rules()
