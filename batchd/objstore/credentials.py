"""The object store's credentials: from systemd credentials or the environment, never
from the configuration file, and never shown.

Looked for in this order, the first complete pair winning:
1. systemd credentials (`LoadCredential=`), in `$CREDENTIALS_DIRECTORY`:
   `oss_access_key_id` + `oss_access_key_secret` (+ `oss_session_token`), then
   `aws_access_key_id` + `aws_secret_access_key` (+ `aws_session_token`);
2. `OSS_ACCESS_KEY_ID` + `OSS_ACCESS_KEY_SECRET` (+ `OSS_SESSION_TOKEN`, an STS token);
3. `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`).
With none, botocore's own chain is left to find them (shared files, a profile, an
instance's role). Half a pair is an error, not a silent fall-through to the next source.
The secret lives in a `Credentials` whose repr hides it; it goes to the client only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from batchd.errors import ConfigError

# (id, secret, token) names, per source.
CREDENTIAL_FILES = (
    ("oss_access_key_id", "oss_access_key_secret", "oss_session_token"),
    ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"),
)
ENV_NAMES = (
    ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"),
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
)


@dataclass(frozen=True, slots=True)
class Credentials:
    """An access key pair (and an STS token), with where it came from."""

    access_key_id: str = field(repr=False)
    secret: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    source: str = ""

    def __str__(self) -> str:
        return f"an access key from {self.source}"


def _read(folder: Path, name: str) -> str | None:
    path = folder / name
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"the systemd credential {path} cannot be read: {exc.strerror}") from None
    return text or None


def _pair(
    key_id: str | None, secret: str | None, token: str | None, names: tuple[str, str], source: str
) -> Credentials | None:
    if key_id and secret:
        return Credentials(key_id, secret, token, source)
    if key_id or secret:
        have, missing = (names[0], names[1]) if key_id else (names[1], names[0])
        raise ConfigError(f"object store credentials: {source} has {have} but not {missing}")
    return None


def storage_credentials(environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The first complete key pair of the sources above, or None (botocore's chain)."""
    env = os.environ if environ is None else environ
    folder = env.get("CREDENTIALS_DIRECTORY")
    if folder:
        for id_name, secret_name, token_name in CREDENTIAL_FILES:
            found = _pair(
                _read(Path(folder), id_name),
                _read(Path(folder), secret_name),
                _read(Path(folder), token_name),
                (id_name, secret_name),
                "systemd credentials",
            )
            if found is not None:
                return found
    for id_name, secret_name, token_name in ENV_NAMES:
        found = _pair(
            env.get(id_name, "").strip() or None,
            env.get(secret_name, "").strip() or None,
            env.get(token_name, "").strip() or None,
            (id_name, secret_name),
            "the environment",
        )
        if found is not None:
            return found
    return None
