"""Benchmarks: scripts that measure gpu-supervisor beside a direct path and nginx (not tests)."""
