-- batchd store, version 1. The single source of truth: a restart rebuilds everything
-- it needs from these rows.

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,            -- stem of the input, names the outbox folder
    inbox_name       TEXT NOT NULL,            -- the name it was dropped under
    inbox_inode      INTEGER,                  -- (dev, inode) seen at claim time
    inbox_dev        INTEGER,
    spool_path       TEXT NOT NULL,            -- where the claimed input lives
    kind             TEXT NOT NULL,            -- jsonl | csv
    state            TEXT NOT NULL,
    outcome          TEXT,
    sha256           TEXT,
    bytes            INTEGER,
    options          TEXT NOT NULL DEFAULT '{}',  -- sidecar options (JSON)
    report           TEXT,                     -- validation report (JSON)
    error            TEXT,
    outbox_path      TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    crash_count      INTEGER NOT NULL DEFAULT 0,  -- restarts that found this job mid-step
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL
);
CREATE INDEX jobs_state ON jobs(state);

CREATE TABLE parts (
    id                INTEGER PRIMARY KEY,
    job_id            TEXT NOT NULL REFERENCES jobs(id),
    seq               INTEGER NOT NULL,
    path              TEXT NOT NULL,           -- the part's JSONL file in the spool
    first_line        INTEGER NOT NULL,        -- input line number of the part's first line
    requests          INTEGER NOT NULL,
    bytes             INTEGER NOT NULL,
    model             TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    state             TEXT NOT NULL,
    upload_name       TEXT NOT NULL,           -- remote filename, traceable to job and part
    remote_file_id    TEXT,
    batch_id          TEXT,
    remote_status     TEXT,
    request_counts    TEXT,                    -- JSON {total, completed, failed}
    output_file_id    TEXT,
    error_file_id     TEXT,
    remote_errors     TEXT,                    -- JSON: the batch's `errors`
    next_poll_at      REAL,
    created_remote_at REAL,
    ended_at          REAL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    error             TEXT,
    UNIQUE (job_id, seq)
);
CREATE INDEX parts_state ON parts(state);
CREATE INDEX parts_job ON parts(job_id);
CREATE INDEX parts_poll ON parts(state, next_poll_at);

-- Remote files to delete once nothing needs them (account quota: 10,000 files).
CREATE TABLE remote_garbage (
    file_id    TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    created_at REAL NOT NULL
);
