-- Outputs a user can take as delivered (issue 16): timings on one clock, names as given.
-- When batchd asked for the part's batch (the create intent that made it), on batchd's
-- own clock: summary.json's `batches_created_at`, beside `ended_at` (also ours).
-- `created_remote_at` stays what it was (the provider's time, ours when it sent none:
-- for paging its list, never shown as a timing).
ALTER TABLE parts ADD COLUMN batch_created_at REAL;
-- The Batch object's own timestamps as JSON {created_at, in_progress_at, ...}, each
-- checked (a garbled one is null): shown as the provider's record, never decided on.
ALTER TABLE parts ADD COLUMN provider_times TEXT;
-- The inbox name's bytes in hex when they are not UTF-8 (NULL when `inbox_name` is
-- exact): a name is recorded as text with each undecodable byte as \xNN, which a name
-- could also hold literally; these bytes say which it was.
ALTER TABLE jobs ADD COLUMN inbox_name_hex TEXT;
