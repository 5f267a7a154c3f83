"""Async jobs that survive the daemon: `Prefer: respond-async` requests stored durably and run later."""
