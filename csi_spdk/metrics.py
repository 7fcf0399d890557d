"""Prometheus metrics shared by the controller, the node plugin and the agent.

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
    "Volume sizes plus clusters held by snapshots in an lvstore (can exceed total when thin).",
    ["target", "lvstore"],
)

# --- agent (csi_spdk/agent/): the storage host's spdk_tgt and its pools -------------
SPDK_TGT_UP = Gauge(
    "csi_spdk_agent_spdk_tgt_up",
    "1 while the agent's spdk_tgt answers spdk_get_version, else 0.",
)
SPDK_TGT_RESTARTS = Counter(
    "csi_spdk_agent_spdk_tgt_restarts_total",
    "spdk_tgt (re)starts the agent recovered from (a new process or a target answering "
    "again after failing).",
)
REPLAY_DURATION = Histogram(
    "csi_spdk_agent_recovery_duration_seconds",
    "Time from a detected spdk_tgt start to pools attached and exports replayed.",
    buckets=_LATENCY_BUCKETS,
)
REPLAYED_OBJECTS = Counter(
    "csi_spdk_agent_replayed_objects_total",
    "Objects the agent re-created (or removed) on spdk_tgt while replaying the desired "
    "state, by kind (transports, subsystems, namespaces, listeners, hosts, keys, qos).",
    ["kind"],
)
REPLAY_FAILURES = Counter(
    "csi_spdk_agent_replay_failures_total",
    "Objects the agent could not re-create while replaying the desired state.",
)
POOL_CAPACITY = Gauge(
    "csi_spdk_agent_pool_capacity_bytes",
    "Data capacity of a pool's lvstore (total_data_clusters x cluster_size).",
    ["pool"],
)
POOL_ALLOCATED = Gauge(
    "csi_spdk_agent_pool_allocated_bytes",
    "Allocated capacity of a pool's lvstore ((total - free clusters) x cluster_size).",
    ["pool"],
)
POOL_READY = Gauge(
    "csi_spdk_agent_pool_ready",
    "1 when the pool's device is attached and its lvstore loaded or created, else 0.",
    ["pool"],
)


class VolumeIoCollector:
    """Per-volume I/O counters from ``bdev_get_iostat``, read at scrape time.

    ``source()`` returns ``(lvol_bdevs, iostat)``: the lvol bdevs (uuid ->
    lvol name) and SPDK's iostat reply. Counters are SPDK's own (they reset when
    spdk_tgt restarts, which Prometheus' rate() handles as a counter reset).
    Latency is SPDK's cumulative latency ticks over its tick rate, in seconds.
    """

    OPS = (("read", "read"), ("write", "written"), ("unmap", "unmapped"))

    def __init__(self, source) -> None:  # source: Callable[[], tuple[dict, dict]]
        self.source = source

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        labels = ["volume", "lvol", "op"]
        nbytes = CounterMetricFamily("csi_spdk_volume_io_bytes",
                                     "Bytes transferred per volume (lvol uuid), by op.",
                                     labels=labels)
        ops = CounterMetricFamily("csi_spdk_volume_io_ops",
                                  "I/O operations per volume (lvol uuid), by op.", labels=labels)
        lat = CounterMetricFamily("csi_spdk_volume_io_latency_seconds",
                                  "Cumulative I/O latency per volume (lvol uuid), by op.",
                                  labels=labels)
        try:
            lvols, stat = self.source()
        except Exception:  # an unreachable target: no samples, never a failed scrape
            lvols, stat = {}, {}
        rate = stat.get("tick_rate") or 1
        for b in stat.get("bdevs", []):
            name = lvols.get(b.get("name"))
            if name is None:
                continue
            for op, key in self.OPS:
                lv = [b["name"], name, op]
                nbytes.add_metric(lv, b.get(f"bytes_{key}", 0))
                ops.add_metric(lv, b.get(f"num_{op}_ops", 0))
                lat.add_metric(lv, b.get(f"{op}_latency_ticks", 0) / rate)
        yield nbytes
        yield ops
        yield lat
# --- the storage agent (csi-spdk agent) -----------------------------------------
# ``method`` is an allow-listed SPDK method, PutKey/DeleteKey, or "other" (a
# refused unknown name: the label set stays bounded whatever a caller sends).
AGENT_REQUESTS = Counter(
    "csi_spdk_agent_requests_total",
    "Agent requests, by SPDK method and outcome (ok, spdk_error, refused, unavailable, "
    "invalid, error).",
    ["method", "outcome"],
)
AGENT_LATENCY = Histogram(
    "csi_spdk_agent_request_duration_seconds",
    "Agent request latency (checks + the SPDK call), by SPDK method and outcome.",
    ["method", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
AGENT_REFUSED = Counter(
    "csi_spdk_agent_refused_total",
    "Agent requests refused with PERMISSION_DENIED, by method and reason.",
    ["method", "reason"],
)
TARGET_UP = Gauge(
    "csi_spdk_target_up",
    "1 when the target's SPDK answered the last health check (spdk_get_version on the "
    "checker's own connection), 0 when it did not.",
    ["target"],
)
