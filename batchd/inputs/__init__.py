"""PURE: what an input is judged by, alike in `batchd validate` and the daemon: the
rules of a JSONL file (validate), the one verdict with its sidecar (verdict), CSV in and
out (csvio), the inbox's naming rules (inbox) and the tolerant line reader (lines)."""
