"""Prometheus metrics that cost the hot path nothing but plain integer arithmetic.

The gateway handles tens of thousands of frames a second on one core, and
``prometheus_client``'s ``Counter.inc()`` takes a lock each time.  So the hot
paths count in plain attributes (:class:`Tally`, :class:`Histogram`), and a
custom collector (:class:`TallyCollector`) turns them into metric families only
when ``/metrics`` is scraped.  Each process has its own registry.

Names follow Prometheus conventions: ``fleetlog_<what>_total`` for counters,
``_seconds`` for durations, base units throughout.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Histogram", "Tally", "TallyCollector", "render"]

#: What a ``/metrics`` answer is served as (Prometheus text format 0.0.4).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds (seconds) of the latency buckets: 0.5 ms to 10 s.
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0, 10.0)

#: Upper bounds of the batch size buckets (records).
SIZE_BUCKETS: Final = (1, 5, 10, 50, 100, 250, 500, 1000, 5000, 10_000, 100_000)


class Histogram:
    """Observations counted per bucket in a plain list: one bisect and two additions each."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram as Prometheus wants it: cumulative buckets."""
        buckets = []
        total = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class Tally:
    """Named plain counters and labelled counters, for a collector to read."""

    __slots__ = ("by_label", "counts")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.by_label: dict[str, dict[str, int]] = {}

    def add(self, name: str, amount: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + amount

    def add_labelled(self, name: str, label: str, amount: int = 1) -> None:
        values = self.by_label.setdefault(name, {})
        values[label] = values.get(label, 0) + amount


#: One metric to export: (kind, name, documentation, how to read it now).
#: ``kind`` is ``counter``, ``gauge`` or ``histogram``; a counter or gauge reads a
#: number, or a dict label value -> number (with the label name after a ``|`` in the name).
Reading = tuple[str, str, str, Callable[[], object]]


class TallyCollector(Collector):
    """Reads plain values at scrape time and yields metric families."""

    def __init__(self, readings: list[Reading]) -> None:
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        for kind, full_name, documentation, read in self._readings:
            name, _, label = full_name.partition("|")
            try:
                value = read()
            except Exception:  # a gauge that cannot be read now (Redis down) is left out
                continue
            if kind == "histogram":
                assert isinstance(value, Histogram)
                yield value.family(name, documentation)
                continue
            family: CounterMetricFamily | GaugeMetricFamily
            if kind == "counter":
                # CounterMetricFamily appends _total itself.
                family = CounterMetricFamily(name.removesuffix("_total"), documentation,
                                             labels=[label] if label else None)
            else:
                family = GaugeMetricFamily(name, documentation, labels=[label] if label else None)
            if isinstance(value, dict):
                for label_value, number in sorted(value.items()):
                    family.add_metric([str(label_value)], float(number))
            elif value is not None:
                assert isinstance(value, int | float)
                family.add_metric([], float(value))
            else:
                continue
            yield family


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)
