"""The exchange boundary (HTTP): the PAPI client (admit, sign, send, read), the keep-alive
transport, signing, accounts, the rate governor, the exchange clock. It imports the core and
the shared settings/metrics/tracing, never the service, Kafka or the CLI (pyproject.toml).
"""
