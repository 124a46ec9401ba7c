"""Optional Prometheus endpoint (prometheus-client), bound to localhost, with the figures
`branch-agent status` shows. Collected on scrape from a status document (`statusview.collect`),
so it serves the same numbers whether it runs inside the agent or beside it
(`branch-agent metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["DEFAULT_PORT", "StatusCollector", "serve"]

DEFAULT_PORT = 9108
StatusDoc = Callable[[], dict[str, Any]]


class StatusCollector(Collector):
    def __init__(self, doc: StatusDoc) -> None:
        self._doc = doc

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        doc = self._doc()
        up = GaugeMetricFamily("branch_agent_up", "1 while the agent process is running")
        up.add_metric([], 1.0 if doc.get("running") else 0.0)
        yield up
        ob = doc.get("outbox", {})
        depth = GaugeMetricFamily("branch_agent_outbox_events", "events held, per priority",
                                  labels=["priority"])
        for prio, n in (ob.get("depth") or {}).items():
            depth.add_metric([str(prio)], float(n))
        yield depth
        age = GaugeMetricFamily("branch_agent_outbox_oldest_unsent_age_seconds",
                                "age of the oldest event not yet sent")
        age.add_metric([], float(ob.get("oldest_unsent_age_s") or 0.0))
        yield age
        seq = GaugeMetricFamily("branch_agent_last_acked_batch_seq",
                                "seq of the last batch the platform acknowledged")
        seq.add_metric([], float(ob.get("last_acked_seq") or 0))
        yield seq
        at = GaugeMetricFamily("branch_agent_last_ack_timestamp_seconds",
                               "when the last ack arrived (unix time; 0 = never)")
        at.add_metric([], float(ob.get("last_acked_at") or 0.0))
        yield at
        dropped = CounterMetricFamily("branch_agent_dropped_events", "events evicted, by reason",
                                      labels=["reason"])
        for reason, n in (ob.get("dropped") or {}).items():
            dropped.add_metric([str(reason)], float(n))
        yield dropped
        uplink = GaugeMetricFamily("branch_agent_uplink_connected",
                                   "1 while the uplink is connected", labels=["uplink", "active"])
        for u in doc.get("uplinks", []):
            name = str(u.get("name"))
            active = "true" if name == doc.get("active_uplink") else "false"
            uplink.add_metric([name, active], 1.0 if u.get("connected") else 0.0)
        yield uplink
        online = GaugeMetricFamily("branch_agent_source_online", "1 while the source is online",
                                   labels=["source"])
        readings = CounterMetricFamily("branch_agent_source_readings", "readings per source",
                                       labels=["source"])
        errors = CounterMetricFamily("branch_agent_source_errors",
                                     "errors per source and kind", labels=["source", "kind"])
        for s in doc.get("sources", []):
            name = str(s.get("name"))
            online.add_metric([name], 1.0 if s.get("state") == "online" else 0.0)
            readings.add_metric([name], float(s.get("readings", 0)))
            for kind, n in (s.get("errors") or {}).items():
                errors.add_metric([name, str(kind)], float(n))
        yield online
        yield readings
        yield errors


def serve(doc: StatusDoc, port: int = DEFAULT_PORT, addr: str = "127.0.0.1") -> Any:
    """Start the endpoint on a daemon thread; returns the WSGI server (call `.shutdown()`).
    Localhost only by default: the branch LAN has no business scraping the gateway."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(doc))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
