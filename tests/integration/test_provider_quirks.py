"""Real servers deviate from the spec; batchd tolerates it (issue 4, "Following").

A small provider on loopback answers the way real ones sometimes do: objects with
missing fields and nulls, an unknown extra status, `request_counts` absent, a result
`body` sent as a JSON string, an error with `type` and no `code`, an empty error file,
a 500 followed by a connection reset on the next request. The daemon must still
publish the right results and never treat the unknown status as finished.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from batchd.testing import (
    daemon_settings,
    drop,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)


class QuirkyProvider:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.ids = itertools.count(1)
        self.retrieves = 0
        self.saw_unknown_status = 0
        self.reset_next = False

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/files", self.upload),
                web.get("/v1/files/{id}/content", self.content),
                web.delete("/v1/files/{id}", self.delete),
                web.post("/v1/batches", self.create),
                web.get("/v1/batches/{id}", self.retrieve),
            ]
        )
        return app

    async def upload(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        data = b""
        async for field in reader:
            if field.name == "file":
                data = await field.read()
        file_id = f"file-{next(self.ids)}"
        self.files[file_id] = data
        return web.json_response({"id": file_id})  # nothing else: no bytes, no status

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        batch_id = f"batch_{next(self.ids)}"
        lines = [orjson.loads(x) for x in self.files[body["input_file_id"]].splitlines()]
        self.batches[batch_id] = {"lines": lines, "input": body["input_file_id"]}
        self.polls[batch_id] = 0
        return web.json_response(
            {
                "id": batch_id,
                "status": "validating",
                "errors": None,
                "request_counts": None,
                "metadata": None,
            }
        )

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        self.retrieves += 1
        if self.reset_next:
            self.reset_next = False
            assert request.transport is not None
            request.transport.close()  # a reset on the request after an error
            raise web.HTTPInternalServerError()
        if self.retrieves == 2:
            self.reset_next = True
            return web.json_response({"error": {"message": "busy"}}, status=500)
        batch_id = request.match_info["id"]
        self.polls[batch_id] += 1
        n = self.polls[batch_id]
        if n <= 2:
            self.saw_unknown_status += 1
            return web.json_response({"id": batch_id, "status": "queued_for_capacity"})
        if n == 3:
            return web.json_response({"id": batch_id, "status": "in_progress"})
        return web.json_response(self._finish(batch_id))

    def _finish(self, batch_id: str) -> dict[str, Any]:
        batch = self.batches[batch_id]
        if "done" not in batch:
            ok, bad = [], []
            for line in batch["lines"]:
                cid = line["custom_id"]
                if cid.endswith("1"):
                    bad.append(
                        {
                            "id": None,
                            "custom_id": cid,
                            "response": {"status_code": 400, "body": None},
                            "error": {"type": "invalid_request_error", "message": "bad"},
                        }
                    )
                else:
                    body = {
                        "choices": [{"message": {"content": f"answer {cid}"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                    }
                    ok.append(
                        {
                            "id": f"r-{cid}",
                            "custom_id": cid,
                            "response": {"status_code": 200, "body": orjson.dumps(body).decode()},
                            "error": None,
                        }
                    )
            out_id, err_id = (
                f"file-batch_output-{next(self.ids)}",
                f"file-batch_output-{next(self.ids)}",
            )
            self.files[out_id] = b"".join(orjson.dumps(x) + b"\n" for x in ok)
            self.files[err_id] = b"".join(orjson.dumps(x) + b"\n" for x in bad)  # may be empty
            batch["done"] = {
                "id": batch_id,
                "status": "completed",
                "output_file_id": out_id,
                "error_file_id": err_id,
                "request_counts": {
                    "total": len(ok) + len(bad),
                    "completed": len(ok),
                    "failed": len(bad),
                },
                "errors": None,
            }
        done: dict[str, Any] = batch["done"]
        return done

    async def content(self, request: web.Request) -> web.Response:
        return web.Response(body=self.files[request.match_info["id"]])

    async def delete(self, request: web.Request) -> web.Response:
        self.files.pop(request.match_info["id"], None)
        return web.json_response({"deleted": True})


class _Base:
    """Only what `daemon_settings` reads of an emulator."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url


async def test_quirks_of_real_servers_are_tolerated(tmp_path: Path) -> None:
    provider = QuirkyProvider()
    runner = web.AppRunner(provider.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        settings = daemon_settings(
            tmp_path / "root",
            _Base(f"http://127.0.0.1:{port}/v1"),  # type: ignore[arg-type]
            api={"max_attempts": 5},
        )
        async with running_daemon(settings):
            drop(settings.paths.folder("inbox"), "mixed.jsonl", requests(3))  # r1 fails
            drop(settings.paths.folder("inbox"), "clean.jsonl", requests(1, prefix="c"))
            folders = await wait_published(settings.paths.folder("outbox"), 2, None)
            # Remote clean-up follows publishing.
            await wait_for(lambda: not provider.files, 10, "the remote files deleted")
    finally:
        await runner.cleanup()
    by_name = {f.name: f for f in folders}
    mixed = summary(by_name["mixed"])
    assert mixed["status"] == "partial"
    assert mixed["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert mixed["usage"]["total_tokens"] == 10  # read through the string body
    (error,) = read_jsonl(by_name["mixed"] / "error.jsonl")
    assert error["custom_id"] == "r1" and error["input_line"] == 2
    csv_text = (by_name["mixed"] / "result.csv").read_bytes().decode("utf-8-sig")
    assert "invalid_request_error" in csv_text and "answer r0" in csv_text
    clean = summary(by_name["clean"])
    assert clean["status"] == "completed"
    assert (by_name["clean"] / "error.jsonl").read_bytes() == b""
    assert provider.saw_unknown_status >= 2  # seen, and not taken for an end
    assert not provider.files  # remote files cleaned up
