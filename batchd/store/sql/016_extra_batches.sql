-- Batches of a part beside the one it follows (issue 22): a gateway whose own client
-- retried a create made two or three of them from one request. Each is recorded when it
-- is found (settling an uncertain create, re-adopting a job after the state was lost, or
-- a list sweep), before it is cancelled, so a crash between the two retries the cancel;
-- `show`, summary.json and /metrics report them: a batch cancelled after it started may
-- still bill the requests it ran.
CREATE TABLE extra_batches (
    batch_id       TEXT PRIMARY KEY,
    job_id         TEXT NOT NULL,
    part_seq       INTEGER NOT NULL,
    kept_batch_id  TEXT NOT NULL,          -- the batch the part follows instead
    found_by       TEXT NOT NULL,          -- settle | adopt | sweep
    found_at       REAL NOT NULL,
    status         TEXT,                   -- its status when last seen
    request_counts TEXT,                   -- JSON, when last seen
    -- pending (a cancel to send) | requested (sent, accepted) | ended (it had ended when
    -- found: nothing to cancel) | gone (the service no longer knows it) | failed (refused)
    cancel         TEXT NOT NULL DEFAULT 'pending',
    attempts       INTEGER NOT NULL DEFAULT 0,
    retry_at       REAL,
    error          TEXT
);
CREATE INDEX extra_batches_job ON extra_batches(job_id);
CREATE INDEX extra_batches_pending ON extra_batches(cancel, retry_at);
-- A sweep asks whether a batch it lists is one batchd follows.
CREATE INDEX parts_batch ON parts(batch_id);
