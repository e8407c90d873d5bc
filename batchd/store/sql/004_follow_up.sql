-- Follow-up parts resubmit retryable failures of earlier parts (jobs.resubmit_failed):
-- round 0 is the original plan, round N the N-th resubmission.
ALTER TABLE parts ADD COLUMN round INTEGER NOT NULL DEFAULT 0;
