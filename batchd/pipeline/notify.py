"""The notify stage: tell the outside world when a job ends or is held, or the account
is paused.

Targets are the webhook URLs of `[notify] webhook_urls` and the `[notify] command`.
Events follow the Standard Webhooks specification: a JSON body
`{"type": "job.ended" | "job.held" | "account.paused", "timestamp": ISO 8601,
"data": {...}}` POSTed
with `webhook-id` (stable per event: retries and restarts send the same one, so a
receiver can drop repeats), `webhook-timestamp` and `webhook-signature`
(`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the `whsec_` secret).

A webhook is POSTed to the URL configured and nowhere else: a redirect (3xx) is never
followed (a 301 or 302 would turn the POST into a GET that delivers nothing; a 307 would
hand the body and its signature to another host or port); it is a failed attempt whose
note names the `Location`. A URL's user and password, query and fragment (a `?token=`)
are never logged or shown (`batchd.logs.shown_url`), in notes and `show` alike.

Delivery is at least once. A published job is announced once: its deliveries are queued
in the same transaction that marks it announced (`Store.announce`). Each delivery is
tried until a 2xx answer (a command: exit 0), with a pause doubling from
`retry_base_s` to `retry_cap_s`, at most `max_attempts` times, then given up (`failed`,
with the last error; `batchd show` lists each). All of it lives in SQLite: a crash or a
restart resumes where it stopped.

The command runs without a shell, in a clean environment (`command_base_environment`):
only PATH, HOME, USER, LOGNAME, LANG, LANGUAGE, the LC_* variables, TZ and TMPDIR pass
from the daemon's, never CREDENTIALS_DIRECTORY, a key or any other variable; then
BATCHD_EVENT, BATCHD_EVENT_JSON and, for a job, BATCHD_JOB_ID, BATCHD_JOB_NAME,
BATCHD_JOB_STATUS (`held` for job.held), BATCHD_JOB_OUTBOX, BATCHD_REQUESTS_TOTAL,
_COMPLETED, _FAILED (empty when not known, never "None"), and for job.held
BATCHD_HOLD_REASON and BATCHD_HOLD_NOTE. It is killed after `command_timeout_s`; its
exit status and the end of its output are logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import NotifySettings, Settings
from batchd.documents import to_json
from batchd.errors import ConfigError
from batchd.logs import get_logger, scrub_urls, shown_url
from batchd.models import Delivery, Job
from batchd.pipeline.account import AccountState
from batchd.pipeline.holds import ends_by_itself
from batchd.store import Store

log = get_logger(__name__)

# Names of where the secret is found (not secrets themselves).
SECRET_PREFIX = "whsec_"  # noqa: S105
SECRET_VARIABLE = "BATCHD_WEBHOOK_SECRET"  # noqa: S105
SECRET_CREDENTIAL = "webhook_secret"  # noqa: S105
COMMAND = "command"
# The only variables of the daemon's environment a command is given (an allow-list: the
# daemon's may hold CREDENTIALS_DIRECTORY, where systemd keeps the API key, or a key).
COMMAND_PASSED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR")
COMMAND_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
OUTPUT_TAIL = 2000
# A receiver's answer is read no further than what a note shows.
ANSWER_SHOWN = 200


def load_webhook_secret(environ: dict[str, str] | None = None) -> bytes | None:
    """The webhook signing key, from BATCHD_WEBHOOK_SECRET or the systemd credential
    `webhook_secret` (never the TOML file): `whsec_` + base64. None when neither is set;
    a ConfigError when it is not in that form."""
    env = dict(os.environ) if environ is None else environ
    text = env.get(SECRET_VARIABLE, "").strip()
    if not text and env.get("CREDENTIALS_DIRECTORY"):
        path = Path(env["CREDENTIALS_DIRECTORY"]) / SECRET_CREDENTIAL
        if path.is_file():
            text = path.read_text(encoding="utf-8").strip()
    if not text:
        return None
    body = text.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < 16:
        raise ConfigError(
            f"{SECRET_VARIABLE}: a webhook secret is whsec_ followed by base64 of 16 bytes"
            " or more (e.g. whsec_$(head -c 32 /dev/urandom | base64))"
        )
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """PURE: the Standard Webhooks signature header of one message."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def job_event(job: Job, at: float) -> dict[str, Any]:
    """PURE: the job.ended event of a published job."""
    total = job.completed + job.failed
    return {
        "type": "job.ended",
        "timestamp": datetime.fromtimestamp(at, UTC).isoformat(),
        "data": {
            "id": job.id,
            "name": job.name,
            "inbox_name": job.inbox_name,
            "status": job.outcome,
            "request_counts": {"total": total, "completed": job.completed, "failed": job.failed},
            "outbox": job.outbox_path,
            "error": job.error,
            "cost": to_json(job.cost) if job.cost is not None else None,
        },
    }


def held_event(job: Job, completed: int = 0, failed: int = 0) -> dict[str, Any]:
    """PURE: the job.held event of a job that waits for money or an operator: its status
    `held`, the hold's reason, note (what it needs, what ends it) and whether it ends by
    itself, and its requests: the input's, as planned, with those `completed` and
    `failed` so far (parts of a split job may have run)."""
    requests = job.report.requests if job.report is not None else None
    total = requests if isinstance(requests, int) and not isinstance(requests, bool) else None
    return {
        "type": "job.held",
        "timestamp": datetime.fromtimestamp(job.held_at or 0.0, UTC).isoformat(),
        "data": {
            "id": job.id,
            "name": job.name,
            "inbox_name": job.inbox_name,
            "status": "held",
            "reason": job.held,
            "note": job.held_note,
            "ends_by_itself": ends_by_itself(job.held),
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            "outbox": None,
        },
    }


def retry_at(attempts: int, now: float, settings: NotifySettings) -> float:
    """PURE: when a delivery that failed `attempts` times is tried next."""
    pause: float = min(settings.retry_cap_s, settings.retry_base_s * 2.0 ** (attempts - 1))
    return now + pause


class Notifications:
    """The notify stage: announce ended jobs and a paused account, deliver what is due."""

    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        secret: bytes | None,
        account: AccountState,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if settings().notify.webhook_urls and secret is None:
            raise ConfigError(
                "[notify] webhook_urls needs a signing secret: set BATCHD_WEBHOOK_SECRET or"
                " give systemd a credential named webhook_secret (whsec_ + base64)"
            )
        self.store = store
        # The settings in force, read where they are used. `[notify]` itself needs a
        # restart: the webhook session is opened once, for the targets named at start.
        self._settings = settings
        self.secret = secret
        self.account = account
        self.clock = clock
        self._announced_pause: float | None = None
        self._announced_holds: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    @property
    def settings(self) -> NotifySettings:
        return self._settings().notify

    @property
    def targets(self) -> list[str]:
        return [*self.settings.webhook_urls, *([COMMAND] if self.settings.command else [])]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_once(self) -> bool:
        busy = await self._announce_jobs()
        await self._announce_pause()
        await self._announce_held()
        due = await self.store.due_deliveries(self.clock.steady())
        if due:
            await asyncio.gather(*(self._deliver(d) for d in due))
        return busy or len(due) == 50

    async def idle_s(self, longest_s: float) -> float:
        """Until the next delivery is due, at most `longest_s`."""
        next_at = await self.store.next_delivery_at()
        if next_at is None:
            return longest_s
        return min(longest_s, max(0.05, next_at - self.clock.steady()))

    # -- queueing -----------------------------------------------------------------------

    def _deliveries(self, msg_id: str, event: dict[str, Any], job_id: str | None) -> list[Delivery]:
        now = self.clock.now()
        # Due at once: on the steady clock `next_at` schedules by, a wall-clock step
        # moves no delivery (created_at is a record, on the wall clock).
        due = self.clock.steady()
        payload = orjson.dumps(event).decode()
        return [
            Delivery(
                msg_id=msg_id,
                target=target,
                event=str(event["type"]),
                job_id=job_id,
                payload=payload,
                next_at=due,
                created_at=now,
            )
            for target in self.targets
        ]

    async def _announce_jobs(self) -> bool:
        jobs = await self.store.jobs_to_announce()
        for job in jobs:
            event = job_event(job, job.updated_at)
            await self.store.announce(
                job.id, self._deliveries(f"msg_{job.id}_ended", event, job.id)
            )
        return len(jobs) == 100

    async def _announce_held(self) -> None:
        """Each hold once (a hold released and made again is a new event); after a
        restart the queue's unique message ids keep an announced hold from repeating."""
        if not self.targets:
            return
        for job in await self.store.held_jobs(limit=100):
            msg_id = f"msg_{job.id}_held_{int((job.held_at or 0.0) * 1000)}"
            if msg_id in self._announced_holds:
                continue
            completed, failed = await self.store.request_totals(job.id)
            event = held_event(job, completed, failed)
            await self.store.announce(None, self._deliveries(msg_id, event, job.id))
            self._announced_holds.add(msg_id)

    async def _announce_pause(self) -> None:
        at = self.account.paused_at
        if at is None or at == self._announced_pause or not self.targets:
            self._announced_pause = at
            return
        self._announced_pause = at
        event = {
            "type": "account.paused",
            "timestamp": datetime.fromtimestamp(at, UTC).isoformat(),
            "data": {"reason": self.account.paused_reason},
        }
        await self.store.announce(
            None, self._deliveries(f"msg_account_{int(at * 1000)}", event, None)
        )

    # -- delivering ---------------------------------------------------------------------

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            if delivery.target == COMMAND:
                error = await self._run_command(delivery)
            else:
                error = await self._post(delivery)
        except Exception as exc:  # one target's trouble is that delivery's, never the stage's
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            error = shown_error(error, delivery.target)
        attempts = delivery.attempts + 1
        now, steady = self.clock.now(), self.clock.steady()
        if error is None:
            state, next_at, delivered_at = "delivered", steady, now
            log.info(
                "notification_delivered", target=shown_url(delivery.target), msg_id=delivery.msg_id
            )
        elif attempts >= self.settings.max_attempts:
            state, next_at, delivered_at = "failed", steady, None
            log.error(
                "notification_given_up",
                target=shown_url(delivery.target),
                msg_id=delivery.msg_id,
                attempts=attempts,
                error=error,
            )
        else:
            next_at = retry_at(attempts, steady, self.settings)
            state, delivered_at = "pending", None
            log.warning(
                "notification_failed",
                target=shown_url(delivery.target),
                msg_id=delivery.msg_id,
                attempts=attempts,
                error=error,
            )
        await self.store.delivery_tried(
            delivery.id,
            state=state,
            attempts=attempts,
            next_at=next_at,
            last_error=error,
            delivered_at=delivered_at,
        )

    async def _post(self, delivery: Delivery) -> str | None:
        assert self.secret is not None  # checked at construction
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        body = delivery.payload.encode()
        timestamp = int(self.clock.now())
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, delivery.msg_id, timestamp, body),
        }
        try:
            async with self._session.post(
                delivery.target, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return None
                if 300 <= resp.status < 400:
                    return redirect_note(resp.status, resp.headers.get("Location"))
                text = (await resp.content.read(ANSWER_SHOWN)).decode(errors="replace")
                return f"HTTP {resp.status}: {text}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _run_command(self, delivery: Delivery) -> str | None:
        argv = self.settings.command
        assert argv
        env = command_base_environment(os.environ)
        env.update(command_environment(delivery))
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert proc.stdout is not None
        try:
            out = await asyncio.wait_for(
                _tail(proc.stdout, OUTPUT_TAIL), self.settings.command_timeout_s
            )
            await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"{argv[0]} did not finish within {self.settings.command_timeout_s:g} s"
        tail = out.decode(errors="replace")
        log.info(
            "notify_command_ran", command=argv[0], exit_status=proc.returncode, output_tail=tail
        )
        return None if proc.returncode == 0 else f"{argv[0]} exited {proc.returncode}"


async def _tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """Read a stream to its end, keeping only its last `keep` bytes: a command that
    prints without end costs no memory."""
    kept = b""
    while chunk := await stream.read(64 * 1024):
        kept = (kept + chunk)[-keep:]
    return kept


def redirect_note(status: int, location: str | None) -> str:
    """PURE: the note of a delivery answered with a redirect, which is never followed."""
    where = f"to {shown_url(location)[:ANSWER_SHOWN]}" if location else "without a Location"
    return (
        f"HTTP {status}: a redirect {where}, not followed (a webhook is POSTed to its"
        " configured URL only: put the final URL in [notify] webhook_urls)"
    )


def shown_error(error: str, target: str) -> str:
    """PURE: a delivery's note as it may be logged, stored and shown: every URL in it as
    `shown_url` shows it, and the target's own user, password and query values masked
    wherever else they appear (a receiver's answer may echo them)."""
    text = scrub_urls(error)
    try:
        parts = urlsplit(target)
        hidden = [parts.username, parts.password, parts.query, parts.fragment]
        hidden += [value for _, value in parse_qsl(parts.query, keep_blank_values=False)]
    except ValueError:
        hidden = []
    for value in sorted({h for h in hidden if h and len(h) >= 3}, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def command_base_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """PURE: what a notify command inherits of the daemon's environment: only the
    variables of COMMAND_PASSED and the locale's LC_* (an allow-list, never a deny-list:
    CREDENTIALS_DIRECTORY, keys and anything else the daemon was given stay behind). PATH
    has a default, as a shell's would."""
    env = {
        name: value
        for name, value in environ.items()
        if name in COMMAND_PASSED or (name.startswith("LC_") and name[3:].isupper())
    }
    env.setdefault("PATH", COMMAND_DEFAULT_PATH)
    return env


def command_environment(delivery: Delivery) -> dict[str, str]:
    """PURE: the variables a notify command gets for one event."""
    event = orjson.loads(delivery.payload)
    data = event.get("data") or {}
    env = {"BATCHD_EVENT": str(event.get("type")), "BATCHD_EVENT_JSON": delivery.payload}
    if delivery.job_id is not None:
        counts = data.get("request_counts") or {}
        env.update(
            {
                "BATCHD_JOB_ID": _text(data.get("id")),
                "BATCHD_JOB_NAME": _text(data.get("name")),
                "BATCHD_JOB_STATUS": _text(data.get("status")),
                "BATCHD_JOB_OUTBOX": _text(data.get("outbox")),
                "BATCHD_REQUESTS_TOTAL": _text(counts.get("total")),
                "BATCHD_REQUESTS_COMPLETED": _text(counts.get("completed")),
                "BATCHD_REQUESTS_FAILED": _text(counts.get("failed")),
            }
        )
        if event.get("type") == "job.held":
            env["BATCHD_HOLD_REASON"] = _text(data.get("reason"))
            env["BATCHD_HOLD_NOTE"] = _text(data.get("note"))
    return env


def _text(value: Any) -> str:
    """PURE: a value as an environment variable holds it: empty when unknown, never
    "None"."""
    return "" if value is None else str(value)
