"""OpenAI-compatible HTTP serving of a bundle (the `serve` extra): one process, or Ray Serve replicas.

Nothing in `dream_export.runtime` imports this package: the runtime stays installable without it.
"""
