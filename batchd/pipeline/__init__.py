"""The stages, in the order work flows: intake, prepare, submit, poll, collect,
publish; the side stages cleanup, account and notify; the loop every stage runs
(stages) and what only the stages use (problems, budget, holds, extras)."""
