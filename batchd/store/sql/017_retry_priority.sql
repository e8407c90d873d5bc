-- What the code queries of a job's options is in columns of its own (issue 23): the job a
-- `batchd retry` job retries (`retry_of`, asked for each job shown and each retry chain)
-- and the sidecar's `priority` (the order parts go out in), until now found with
-- json_extract in every query. The options keep them too (summary.json says what the job
-- ran with); the store writes both columns whenever it writes the options, from the same
-- JSON, so that they never disagree.
-- No declared type: each holds the value exactly as json_extract read it (a sidecar's
-- priority is whatever the user wrote: a number, a text, null), so queries order and
-- compare as they did.
ALTER TABLE jobs ADD COLUMN retry_of;
ALTER TABLE jobs ADD COLUMN priority;
UPDATE jobs SET
    retry_of = json_extract(options, '$.retry_of'),
    priority = json_extract(options, '$.priority');
CREATE INDEX jobs_retry_of ON jobs(retry_of) WHERE retry_of IS NOT NULL;
