"""What the outbox is made of: results merged in input order (merge), retry chains merged
again (remerge), and which failed requests may be sent again (failures)."""
