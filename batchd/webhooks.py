"""The notify stage: tell the outside world when a job ends or is held, or the account
is paused.

Targets are the webhook URLs of `[notify] webhook_urls` and the `[notify] command`.
Events follow the Standard Webhooks specification: a JSON body
`{"type": "job.ended" | "job.held" | "account.paused", "timestamp": ISO 8601,
"data": {...}}` POSTed
with `webhook-id` (stable per event: retries and restarts send the same one, so a
receiver can drop repeats), `webhook-timestamp` and `webhook-signature`
(`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the `whsec_` secret).

Delivery is at least once. A published job is announced once: its deliveries are queued
in the same transaction that marks it announced (`Store.announce`). Each delivery is
tried until a 2xx answer (a command: exit 0), with a pause doubling from
`retry_base_s` to `retry_cap_s`, at most `max_attempts` times, then given up (`failed`,
with the last error; `batchd show` lists each). All of it lives in SQLite: a crash or a
restart resumes where it stopped.

The command runs without a shell, its environment the daemon's without any secret plus
BATCHD_EVENT, BATCHD_EVENT_JSON and, for a job, BATCHD_JOB_ID, BATCHD_JOB_NAME,
BATCHD_JOB_STATUS (`held` for job.held), BATCHD_JOB_OUTBOX, BATCHD_REQUESTS_TOTAL,
_COMPLETED, _FAILED (empty when not known, never "None"), and for job.held
BATCHD_HOLD_REASON and BATCHD_HOLD_NOTE; it is killed after `command_timeout_s`; its
exit status and the end of its output are logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from batchd.account import AccountState
from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import NotifySettings
from batchd.errors import ConfigError
from batchd.holds import ends_by_itself
from batchd.logs import get_logger
from batchd.models import Delivery, Job
from batchd.store import Store

log = get_logger(__name__)

# Names of where the secret is found (not secrets themselves).
SECRET_PREFIX = "whsec_"  # noqa: S105
SECRET_VARIABLE = "BATCHD_WEBHOOK_SECRET"  # noqa: S105
SECRET_CREDENTIAL = "webhook_secret"  # noqa: S105
COMMAND = "command"
# Never handed to the command: the keys and the webhook secret.
_SECRET_VARIABLES = ("BATCHD_API_KEY", "DASHSCOPE_API_KEY", "OPENAI_API_KEY", SECRET_VARIABLE)
OUTPUT_TAIL = 2000


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
            "cost": job.cost,
        },
    }


def held_event(job: Job, completed: int = 0, failed: int = 0) -> dict[str, Any]:
    """PURE: the job.held event of a job that waits for money or an operator: its status
    `held`, the hold's reason, note (what it needs, what ends it) and whether it ends by
    itself, and its requests: the input's, as planned, with those `completed` and
    `failed` so far (parts of a split job may have run)."""
    requests = (job.report or {}).get("requests")
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
        settings: NotifySettings,
        secret: bytes | None,
        account: AccountState,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if settings.webhook_urls and secret is None:
            raise ConfigError(
                "[notify] webhook_urls needs a signing secret: set BATCHD_WEBHOOK_SECRET or"
                " give systemd a credential named webhook_secret (whsec_ + base64)"
            )
        self.store = store
        self.settings = settings
        self.secret = secret
        self.account = account
        self.clock = clock
        self._announced_pause: float | None = None
        self._announced_holds: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

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
        due = await self.store.due_deliveries(self.clock.now())
        if due:
            await asyncio.gather(*(self._deliver(d) for d in due))
        return busy or len(due) == 50

    async def idle_s(self, longest_s: float) -> float:
        """Until the next delivery is due, at most `longest_s`."""
        next_at = await self.store.next_delivery_at()
        if next_at is None:
            return longest_s
        return min(longest_s, max(0.05, next_at - self.clock.now()))

    # -- queueing -----------------------------------------------------------------------

    def _deliveries(self, msg_id: str, event: dict[str, Any], job_id: str | None) -> list[Delivery]:
        now = self.clock.now()
        payload = orjson.dumps(event).decode()
        return [
            Delivery(
                msg_id=msg_id,
                target=target,
                event=str(event["type"]),
                job_id=job_id,
                payload=payload,
                next_at=now,
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
        attempts = delivery.attempts + 1
        now = self.clock.now()
        if error is None:
            state, next_at, delivered_at = "delivered", now, now
            log.info(
                "notification_delivered", target=_shown(delivery.target), msg_id=delivery.msg_id
            )
        elif attempts >= self.settings.max_attempts:
            state, next_at, delivered_at = "failed", now, None
            log.error(
                "notification_given_up",
                target=_shown(delivery.target),
                msg_id=delivery.msg_id,
                attempts=attempts,
                error=error,
            )
        else:
            state, next_at, delivered_at = "pending", retry_at(attempts, now, self.settings), None
            log.warning(
                "notification_failed",
                target=_shown(delivery.target),
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
            async with self._session.post(delivery.target, data=body, headers=headers) as resp:
                if 200 <= resp.status < 300:
                    return None
                # A receiver's answer is read no further than what a note shows.
                text = (await resp.content.read(200)).decode(errors="replace")
                return f"HTTP {resp.status}: {text}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _run_command(self, delivery: Delivery) -> str | None:
        argv = self.settings.command
        assert argv
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_VARIABLES}
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


def _shown(target: str) -> str:
    """A target as logs show it: a URL without its query (it may hold a token)."""
    return target.split("?", 1)[0]
