"""Prometheus metrics shared by the controller and the node plugin.

One module owns every metric so names stay consistent and a newcomer finds
them in one place. Served over HTTP by ``server.start_metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)

CSI_REQUESTS = Counter(
    "csi_spdk_rpc_requests_total",
    "CSI gRPC calls handled, by method and gRPC status code.",
    ["method", "code"],
)
CSI_LATENCY = Histogram(
    "csi_spdk_rpc_duration_seconds",
    "CSI gRPC call latency, by method and gRPC status code.",
    ["method", "code"],
    buckets=_LATENCY_BUCKETS,
)
SPDK_LATENCY = Histogram(
    "csi_spdk_spdk_rpc_duration_seconds",
    "SPDK JSON-RPC call latency, by SPDK method and outcome (ok, error, transport).",
    ["method", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
LVSTORE_TOTAL = Gauge(
    "csi_spdk_lvstore_total_bytes",
    "Data capacity of an lvstore (total_data_clusters x cluster_size).",
    ["target", "lvstore"],
)
LVSTORE_FREE = Gauge(
    "csi_spdk_lvstore_free_bytes",
    "Unallocated capacity of an lvstore (free_clusters x cluster_size).",
    ["target", "lvstore"],
)
LVSTORE_PROVISIONED = Gauge(
    "csi_spdk_lvstore_provisioned_bytes",
    "Sum of the sizes of the driver's lvols in an lvstore (can exceed total when thin).",
    ["target", "lvstore"],
)
