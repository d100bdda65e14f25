"""Kafka-driven worker that cancels Binance Portfolio Margin conditional and algo orders.

Layout: a pure core (``commands``, ``routes``, ``signing``, ``errors``, ``normalize``,
``events``, ``offsets``) and thin adapters for the boundaries (``papi`` for HTTP,
``kafka_io`` for Kafka, ``cli`` for the shell). ``sim`` is the PAPI simulator.
"""

__version__ = "0.1.0"
