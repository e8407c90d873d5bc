-- Issue 22: when the service stored a part's input file, on the service's own clock (the
-- upload's answer, or the listing that adopted it). Finding a batch whose create answer
-- was lost pages the list back past this moment, not past batchd's intent: a wall clock
-- hours ahead of the service's (or stepped forward) made the intent look later than
-- every batch of the first page, "proved" the batch absent, and created it a second time.
-- NULL for parts uploaded before it was kept (and services that send no created_at):
-- those page back past the intent, as before.
ALTER TABLE parts ADD COLUMN file_created_at REAL;
