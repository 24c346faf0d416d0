"""e2b-gateway's own /metrics: its HTTP requests by API, method and status.

Labels are bounded: ``api`` is one of :data:`APIS` (never a path or a sandbox
id), ``code`` the HTTP status. Served on AGENTVM_E2B_GATEWAY_METRICS_ADDR
(127.0.0.1:9474 by default) like every service's (common/telemetry.py).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# What a request was for: the REST API (sandboxes, keys), envd's Connect
# services and plain HTTP, the code interpreter, a sandbox's health, or a
# request refused before routing (too many in flight).
APIS = (
    "rest",
    "envd-process",
    "envd-filesystem",
    "envd-http",
    "interpreter",
    "sandbox-health",
    "refused",
)
SCOPE_KEY = "agentvm.api"

REQUESTS = Counter(
    "agentvm_e2b_http_requests",
    "HTTP requests e2b-gateway answered, by API, method and status code",
    ["api", "method", "code"],
)
SECONDS = Histogram(
    "agentvm_e2b_http_request_seconds",
    "Time from a request's arrival to the end of its answer (streams included)",
    ["api"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe(api: str, method: str, code: int, seconds: float) -> None:
    """One request answered (``code`` 0: the client left before any answer)."""
    api = api if api in APIS else "rest"
    method = method if method in METHODS else "OTHER"
    REQUESTS.labels(api, method, str(code)).inc()
    SECONDS.labels(api).observe(seconds)
