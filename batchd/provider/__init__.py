"""The Batch API: its client (api), its answers checked at the boundary (remote), each
provider's profile (profiles), prices, token counts (tokens, tokenbound) and the rate
caps (limits)."""
