"""dmctl: a shell client for dmd, over D-Bus only."""
