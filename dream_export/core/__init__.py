"""What several packages share: the graph I/O contract, prompt reading and encoding, numerical helpers.

Modules here import no torch and no transformers (the runtime uses them) and nothing from the other
packages of dream_export except `errors`.
"""
