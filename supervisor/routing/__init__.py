"""Choosing a replica for a request: session and prefix affinity (pure decisions in `affinity`)."""
