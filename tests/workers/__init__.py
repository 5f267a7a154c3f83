"""Worker processes and helpers for tests that start real workers (ctl_worker, FastAPI, Flask)."""
