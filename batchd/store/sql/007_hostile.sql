-- Servers and inputs that misbehave (issue 12).
-- When the part's current intent (uploading, creating) was committed: after a lost create
-- answer, recovery pages the batch list back past this moment to find the batch.
ALTER TABLE parts ADD COLUMN intent_at REAL;
-- A part step that failed is tried again no sooner than this (a growing pause); a part
-- that failed `max_part_failures` times is parked, and remembers the state it was in.
ALTER TABLE parts ADD COLUMN retry_at REAL;
ALTER TABLE parts ADD COLUMN parked_from TEXT;
-- Result files that could not be fetched (404, a permanent error, too many failures), as
-- JSON {"output": reason, "error": reason}: their requests are published with a code of
-- their own instead of waiting forever.
ALTER TABLE parts ADD COLUMN unavailable TEXT;
-- Parts planned again from the spool after the database lost them: their remote file and
-- batch are looked for (by name and metadata) before anything is uploaded or created.
ALTER TABLE parts ADD COLUMN adopt INTEGER NOT NULL DEFAULT 0;
-- The validated input's mtime (beside `bytes` and `sha256`): a producer still writing the
-- file after its claim changes it, and that must be seen before upload and publishing.
ALTER TABLE jobs ADD COLUMN input_mtime_ns INTEGER;
-- How often the input was validated (a changed input is validated again, a few times).
ALTER TABLE jobs ADD COLUMN prepares INTEGER NOT NULL DEFAULT 0;
-- The inbox name of the retry input written for this job: `batchd retry` run twice
-- answers with the first one instead of paying for the same requests again.
ALTER TABLE jobs ADD COLUMN retried_as TEXT;
-- Set when the job was re-created from its spool folder after the database lost it.
ALTER TABLE jobs ADD COLUMN recovered_at REAL;
-- Parts that need an operator's eye (failing, parked) are found without a scan.
CREATE INDEX parts_attempts ON parts(attempts, state);
