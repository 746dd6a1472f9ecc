"""Serving a model: the terminal chat and the OpenAI-compatible HTTP server."""
