"""Serving: the OpenAI-compatible app, its guard, request schemas and the batching worker."""
