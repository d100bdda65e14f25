"""The Kafka boundary: the pipeline (consume, process, publish, commit), the consumer,
producer and sinks, KIP-447 fencing, topic readers, the duplicate window. It imports the core
and the shared settings/metrics/tracing, never the service, the exchange or the CLI
(pyproject.toml).
"""
