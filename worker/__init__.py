"""Kafka-driven worker that cancels Binance Portfolio Margin conditional and algo orders.

Layout, by boundary (import direction checked by import-linter, pyproject.toml):
``worker.core`` (pure), ``worker.exchange`` (HTTP) and ``worker.kafka`` (Kafka) below the
service modules at this level (``app`` wires them; ``settings``, ``metrics`` and ``tracing``
are shared by every tier but the core), ``worker.cli`` on top, ``worker.client`` the public
library; ``worker.tools`` (simulator, demo, dev stack) is never imported by the runtime.
"""

__version__ = "0.1.0"
