"""The pure core: decode and check a command, its route and request, what an answer means,
the kill switch's sweep, the result events. No I/O and no adapter: it imports nothing of
``worker.exchange``, ``worker.kafka``, the service or the CLI (import-linter, pyproject.toml).
"""
