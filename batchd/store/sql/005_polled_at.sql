-- When a running part was last observed, so that the next poll can follow its progress
-- (two observations give a rate, and the rate an expected end).
ALTER TABLE parts ADD COLUMN polled_at REAL;
