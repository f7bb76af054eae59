"""The alerts' counters for ``/metrics`` (the API's), read from Redis at scrape time.

The alerter counts in ``fleetlog:{alerts}:stats`` inside its commit and
delivery scripts, so the numbers survive restarts and failovers of the
alerter and are the same whichever API process is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["OUTCOMES", "AlertsCollector"]

#: What becomes of one delivery attempt.
OUTCOMES = ("delivered", "retried", "failed", "muted", "cancelled")


class AlertsCollector(Collector):
    """``read`` returns :meth:`fleetlog.alerts.book.AlertBook.stats`; left out while Redis is down."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._read()
        except Exception:
            return
        for name, documentation, key in (
            ("fleetlog_alerts_evaluations", "Record rule evaluations (a record against a rule).",
             "evaluations"),
            ("fleetlog_alerts_evaluation_errors", "Evaluations that failed (a missing field, a type "
             "mismatch): the record did not match.", "evaluation_errors"),
            ("fleetlog_alerts_firings", "Firings opened.", "firings"),
        ):
            yield CounterMetricFamily(name, documentation, value=float(stats.get(key, 0)))
        deliveries = CounterMetricFamily("fleetlog_alerts_deliveries", "Notification attempts by outcome.",
                                         labels=["outcome"])
        for outcome in OUTCOMES:
            deliveries.add_metric([outcome], float(stats.get(f"deliveries:{outcome}", 0)))
        yield deliveries
        yield GaugeMetricFamily("fleetlog_alerts_firing", "Firings open now.",
                                value=float(max(0, stats.get("open", 0))))
        yield GaugeMetricFamily("fleetlog_alerts_pending_notifications",
                                "Notifications not yet delivered nor given up on.",
                                value=float(stats.get("pending_notifications", 0)))
