-- What work costs and what it may cost (issue 15).
-- Each part's input tokens and its worst case (output bounded by max_tokens or the
-- model's output limit), counted when the job is planned; `cost_max` is the worst-case
-- batch price of the part, NULL when a model of it has no price (unknown, never 0).
ALTER TABLE parts ADD COLUMN input_tokens INTEGER;
ALTER TABLE parts ADD COLUMN output_tokens_max INTEGER;
ALTER TABLE parts ADD COLUMN cost_max REAL;
-- A published job's actual cost: JSON {amount, currency, per_model, ...}.
ALTER TABLE jobs ADD COLUMN cost TEXT;
-- Why a job waits for an operator or for money: budget | duplicate (NULL: it does not).
ALTER TABLE jobs ADD COLUMN held TEXT;
ALTER TABLE jobs ADD COLUMN held_note TEXT;
ALTER TABLE jobs ADD COLUMN held_at REAL;
CREATE INDEX jobs_held ON jobs(held) WHERE held IS NOT NULL;
-- What was spent, per published job, when: budgets and `status` sum it by period.
CREATE TABLE spend (
    job_id   TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount   REAL NOT NULL,
    at       REAL NOT NULL
);
CREATE INDEX spend_at ON spend(at);
