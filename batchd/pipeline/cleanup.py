"""The remote clean-up stage: delete the remote files nobody needs any more.

Publishing queues a job's remote input, output and error files (`remote_garbage`); so do
stray uploads found while settling. The account holds at most 10,000 files and 100 GB,
so this stage deletes them, 50 at a time, within the files call cap. A file already gone
counts as deleted; a failed delete is tried again on a later pass.
"""

from __future__ import annotations

from batchd.failpoints import failpoint
from batchd.logs import get_logger
from batchd.pipeline.account import AccountState
from batchd.provider.api import AccountError, ApiError, BatchApi
from batchd.store import Store

log = get_logger(__name__)

BATCH = 50


class RemoteCleanup:
    def __init__(self, store: Store, api: BatchApi, account: AccountState) -> None:
        self.store = store
        self.api = api
        self.account = account

    async def run_once(self) -> bool:
        if self.account.silent:
            return False  # nothing is called while the provider answers nothing
        moved = False
        for file_id in await self.store.garbage(limit=BATCH):
            try:
                await self.api.delete_file(file_id)
            except AccountError as err:
                self.account.failed(err)
                return moved
            except ApiError as err:
                log.warning("remote_delete_failed", file_id=file_id, error=str(err))
                return moved
            failpoint("cleanup.after_request")
            await self.store.drop_garbage(file_id)
            moved = True
        return moved
