"""Data files batchd reads at run time (the approximation's table: batchd.provider.tokenbound)."""
