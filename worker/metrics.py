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
UNAUTHORIZED = Counter(
    "cancel_worker_unauthorized_total",
    "Commands refused as unauthorized (unsigned, forged, unknown producer, not entitled), by "
    "producer (a producer id of the producers file, or unknown) and cause",
    ["producer", "cause"],
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
RESULTS_PUBLISHABLE = Gauge(
    "cancel_worker_results_publishable",
    "0 while a flush of results has waited on Kafka for more than a few seconds, else 1",
)
FENCED_PARTITIONS = Gauge(
    "cancel_worker_fenced_partitions",
    "Partitions fenced while still assigned: their records are dropped until re-assigned",
)
TAKE_OVER_FAILURES = Counter(
    "cancel_worker_take_over_failures_total",
    "Failed attempts to take over assigned partitions (retried)",
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
SWEEP_OMITTED = Counter(
    "cancel_worker_kill_switch_orders_omitted_total",
    "Listed orders left out of a kill switch's result to fit one record (counted in its "
    "omitted object), by group",
    ["group"],
)

# -- what the on-call engineer asks (refreshed from the running worker at each scrape) ------

BUILD_INFO = Gauge(
    "cancel_worker_build_info", "Always 1; the version and Python running", ["version", "python"]
)
EXCHANGE_SECONDS = Histogram(
    "cancel_worker_exchange_request_seconds",
    "PAPI request latency, sent to answer read, by route and HTTP status "
    "(no_answer: timeout or reset after sending)",
    ["route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RETRIES = Counter(
    "cancel_worker_retries_total",
    "Requests sent again after an attempt failed, by the failure's reason",
    ["reason"],
)
CONSUMER_LAG = Gauge(
    "cancel_worker_consumer_lag_records",
    "Records of the commands topic behind the end of each assigned partition: from the "
    "committed position (not yet answered durably) and from the fetched position (not yet read)",
    ["topic", "partition", "position"],
)
ASSIGNED_PARTITIONS = Gauge(
    "cancel_worker_assigned_partitions", "Commands topic partitions assigned to this worker"
)
OLDEST_IN_FLIGHT = Gauge(
    "cancel_worker_oldest_in_flight_seconds",
    "Age of the oldest command read and not yet answered durably (0 when none)",
)
GOVERNOR_WEIGHT_USED = Gauge(
    "cancel_worker_governor_weight_used",
    "Request weight counted in the exchange's current window (this process's view)",
)
GOVERNOR_WEIGHT_LIMIT = Gauge(
    "cancel_worker_governor_weight_limit", "The weight budget per window (RATE_WEIGHT_LIMIT)"
)
BANNED_UNTIL = Gauge(
    "cancel_worker_exchange_banned_until_timestamp_seconds",
    "End of the exchange's current IP ban (418), Unix time; 0 when not banned",
)
PAUSED_UNTIL = Gauge(
    "cancel_worker_exchange_paused_until_timestamp_seconds",
    "End of the current 429 pause ordered by the exchange, Unix time; 0 when none",
)
CLOCK_OFFSET = Gauge(
    "cancel_worker_clock_offset_seconds", "Exchange clock minus the local clock, last estimate"
)
CLOCK_SYNCED_AT = Gauge(
    "cancel_worker_clock_last_sync_timestamp_seconds",
    "When the exchange clock was last read successfully, Unix time; 0 before the first",
)
READY = Gauge("cancel_worker_ready", "1 while /readyz passes, else 0")
HEALTHY = Gauge("cancel_worker_healthy", "1 while /healthz passes, else 0")
