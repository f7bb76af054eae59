"""fleetlog.metrics: plain counters turned into Prometheus families at scrape time, parsed back."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fleetlog.metrics import Histogram, Tally, TallyCollector, render


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of a scrape, as ``name{label="value"}`` -> value, parsed by prometheus_client."""
    samples = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    latency = Histogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.05, 0.5, 7.0):
        latency.observe(value)
    registry = CollectorRegistry()
    registry.register(TallyCollector([("histogram", "ack_seconds", "Ack latency.", lambda: latency)]))
    got = scrape(registry)
    # A value equal to a bound falls in that bound's bucket (Prometheus' "less or equal").
    assert got['ack_seconds_bucket{le="0.001"}'] == 2
    assert got['ack_seconds_bucket{le="0.01"}'] == 3
    assert got['ack_seconds_bucket{le="0.1"}'] == 4
    assert got['ack_seconds_bucket{le="+Inf"}'] == 6
    assert got["ack_seconds_count"] == 6
    assert abs(got["ack_seconds_sum"] - 7.5535) < 1e-9


def test_tallies_become_counters_and_gauges_labelled_or_not_and_unreadable_ones_are_left_out() -> None:
    tally = Tally()
    tally.add("frames")
    tally.add("frames", 41)
    tally.add_labelled("errors", "busy")
    tally.add_labelled("errors", "bad_frame", 3)
    tally.add_labelled("errors", "busy", 2)

    def broken() -> object:
        raise ConnectionError("Redis is down")

    registry = CollectorRegistry()
    registry.register(TallyCollector([
        ("counter", "fleetlog_frames_total", "Frames.", lambda: tally.counts["frames"]),
        ("counter", "fleetlog_errors_total|code", "Errors by code.", lambda: tally.by_label["errors"]),
        ("gauge", "fleetlog_connections", "Open now.", lambda: 7),
        ("gauge", "fleetlog_backlog", "Queue backlog.", broken),
        ("gauge", "fleetlog_unknown", "Not known yet.", lambda: None),
    ]))
    got = scrape(registry)
    assert got["fleetlog_frames_total"] == 42
    assert got['fleetlog_errors_total{code="bad_frame"}'] == 3
    assert got['fleetlog_errors_total{code="busy"}'] == 3
    assert got["fleetlog_connections"] == 7
    # A reading that fails (Redis down) or is not known is absent, and the rest of the scrape is there.
    assert not any(name.startswith(("fleetlog_backlog", "fleetlog_unknown")) for name in got)
