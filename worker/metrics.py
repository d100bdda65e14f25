"""Prometheus metrics (exposed on ``CANCEL_WORKER_METRICS_PORT`` when it is set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RESULTS = Counter("cancel_worker_results_total", "Result events published", ["type", "reason"])
HTTP_REQUESTS = Counter(
    "cancel_worker_http_requests_total", "PAPI requests sent", ["route", "outcome"]
)
DEADLETTERS = Counter(
    "cancel_worker_deadletters_total", "Raw records sent to the dead-letter topic"
)
ALREADY_ANSWERED = Counter(
    "cancel_worker_already_answered_total",
    "Commands read again whose result is already on the results topic (nothing published)",
)
IN_FLIGHT = Gauge("cancel_worker_in_flight", "Commands being processed")
COMMITS = Counter("cancel_worker_offset_commits_total", "Offset commits")
COMMAND_SECONDS = Histogram(
    "cancel_worker_command_seconds",
    "From start of processing to result in hand, per command",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GOVERNOR_WAITS = Counter(
    "cancel_worker_governor_waits_total", "Requests the rate governor held back", ["reason"]
)
GOVERNOR_WAIT_SECONDS = Histogram(
    "cancel_worker_governor_wait_seconds",
    "Time requests waited for the rate governor",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
)
GOVERNOR_STOPS = Counter(
    "cancel_worker_governor_stops_total", "Traffic stops ordered by the exchange", ["kind"]
)
RECONCILIATIONS = Counter(
    "cancel_worker_reconciliations_total",
    "Order-status queries after an ambiguous or gone answer",
    ["finding"],
)
PAUSED_PARTITIONS = Gauge(
    "cancel_worker_paused_partitions", "Partitions whose fetch is paused (deep queue)"
)
KAFKA_REACHABLE = Gauge(
    "cancel_worker_kafka_reachable", "1 while results can be published and committed, else 0"
)
ABANDONED = Counter(
    "cancel_worker_abandoned_total",
    "Running commands cancelled at a revocation or shutdown bound (read again later)",
)
TRANSACTIONS = Counter(
    "cancel_worker_transactions_total", "Result transactions, by outcome", ["outcome"]
)
EXCHANGE_REACHABLE = Gauge(
    "cancel_worker_exchange_reachable",
    "0 while the exchange refuses connections (requests are not sent), else 1",
)
EXCHANGE_OUTAGES = Counter(
    "cancel_worker_exchange_unreachable_total",
    "Times the exchange went from accepting connections to refusing them",
)
NOT_SENT = Counter(
    "cancel_worker_http_not_sent_total",
    "Requests that never left (connection refused or timed out), tried again until the deadline",
)
SWEEP_ROUTES = Counter(
    "cancel_worker_kill_switch_routes_total",
    "Routes swept by kill switches, by route and outcome (done, unconfirmed, retired, failed)",
    ["route", "outcome"],
)
SWEEP_ORDERS = Counter(
    "cancel_worker_kill_switch_orders_total",
    "Orders listed by kill switches, by what became of them",
    ["group"],
)
