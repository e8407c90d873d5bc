-- Lookups that run once per job and must not read every job: is an outbox name taken,
-- which running jobs wait to be cancelled.
CREATE INDEX jobs_outbox ON jobs(outbox_path);
CREATE INDEX jobs_cancel ON jobs(cancel_requested, state);
