-- Final request counts and token usage of published jobs, for status and metrics.
ALTER TABLE jobs ADD COLUMN completed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN usage TEXT;
