"""gpu-supervisor: a sidecar daemon that keeps a GPU model service alive and fair under load."""

__version__ = "0.1.0"
