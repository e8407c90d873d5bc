-- Claims from an inbox on a bucket (issue 24): an object cannot be renamed into the spool,
-- so its claim is several requests (copy it in, delete it from the inbox), each framed by
-- a committed step here, with the job's row (state CLAIMING until the last step). A row
-- says which version of which key the job took: (inbox_key, etag) is unique among the
-- claims not finished, so that one version is never claimed twice; a finished row stays
-- with its job (what was claimed, for `batchd show` and for an audit).
-- step: 'copying' (the intent: nothing copied yet, or part of it), 'copied' (the spool
-- holds the whole object: delete it from the inbox next), 'claimed' (done).
CREATE TABLE inbox_claims (
    job_id TEXT PRIMARY KEY,
    inbox_key TEXT NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    sidecar_key TEXT,
    sidecar_etag TEXT,
    step TEXT NOT NULL CHECK (step IN ('copying', 'copied', 'claimed')),
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX inbox_claims_open ON inbox_claims(inbox_key, etag) WHERE step != 'claimed';
