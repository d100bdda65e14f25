"""The operations endpoint on ``CANCEL_WORKER_METRICS_PORT``: ``/metrics`` (Prometheus
text), ``/healthz`` (liveness) and ``/readyz`` (readiness); any other path is 404."""

from __future__ import annotations

METRICS_PATH = "/metrics"
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
# The port the container image, the compose file and the Kubernetes manifests use.
DEPLOY_PORT = 9400
