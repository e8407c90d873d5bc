-- Notifications (webhooks, a command) when a job ends. A job is announced once: its
-- deliveries are written in the same transaction that marks it announced, so a crash
-- neither loses nor repeats the announcement. Jobs published before this migration were
-- never announced and never will be.
ALTER TABLE jobs ADD COLUMN notified INTEGER NOT NULL DEFAULT 1;

CREATE TABLE deliveries (
    id           INTEGER PRIMARY KEY,
    msg_id       TEXT NOT NULL,            -- the Standard Webhooks webhook-id, stable
    target       TEXT NOT NULL,            -- a webhook URL, or "command"
    event        TEXT NOT NULL,            -- job.ended | account.paused
    job_id       TEXT,
    payload      TEXT NOT NULL,            -- the JSON body sent
    state        TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | failed
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      REAL NOT NULL,
    last_error   TEXT,
    created_at   REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (msg_id, target)
);
CREATE INDEX deliveries_due ON deliveries(state, next_at);
CREATE INDEX deliveries_job ON deliveries(job_id);
-- Only the few jobs not yet announced are in it: the notify stage never scans the rest.
CREATE INDEX jobs_unannounced ON jobs(updated_at) WHERE notified = 0;
