"""Command-line commands, one module per group; `batchd.cli` assembles them."""
