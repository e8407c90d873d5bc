-- `batchd jobs` lists newest first, a page at a time from where the last one ended; a
-- job is also found by its exact name.
CREATE INDEX jobs_created ON jobs(created_at, id);
CREATE INDEX jobs_name ON jobs(name);

-- What an operator decided that must outlive a restart (an intake pause).
CREATE TABLE flags (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- `batchd submit` finds the job its file became by the token it put in the sidecar.
CREATE INDEX jobs_submit_id ON jobs(json_extract(options, '$.submit_id'))
    WHERE json_extract(options, '$.submit_id') IS NOT NULL;
