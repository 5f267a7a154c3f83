"""The built-in transformers worker: an OpenAI-compatible HTTP server on a Unix socket."""
