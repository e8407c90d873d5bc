-- The duplicate guard compares requests, not bytes (issue 21): the sha256 of an input's
-- requests in canonical form (`validate.canonical_request`), so that CRLF line endings,
-- spacing or key order make no new input. Jobs validated before this version have none
-- (NULL): for them the guard still compares the input's bytes (`sha256`).
ALTER TABLE jobs ADD COLUMN requests_sha256 TEXT;
CREATE INDEX jobs_requests_sha256 ON jobs(requests_sha256);
