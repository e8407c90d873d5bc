-- An input identical to one already run is refused unless its sidecar allows it: found
-- by its sha256.
CREATE INDEX jobs_sha256 ON jobs(sha256);
