"""Metrics recorded on every request, without locks.

prometheus-client's metrics take a lock on every update (they may be updated from any
thread), and a histogram looks for its bucket in a Python loop.  The request path updates
its metrics only from the event loop, so these families keep plain numbers (a histogram
finds its bucket by bisection) and turn them into the same samples
when the registry is scraped.  Names, help texts, labels and ``_created`` series are
those prometheus-client would export.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from gateway.core.buckets import COMPILED, bucket

__all__ = ["LoopCounter", "LoopGauge", "LoopHistogram"]


class CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class HistogramChild:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        counts = self.counts
        n = bucket(self.bounds, value) if COMPILED else bisect_left(self.bounds, value)
        counts[n] = counts[n] + 1  # (compiled: an int addition, not a generic +=)
        self.sum += value


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)


class _Family(Collector, Generic[C]):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], C] = {}
        registry.register(self)

    def _new(self) -> C:
        raise NotImplementedError

    def labels(self, *values: str) -> C:
        if len(values) != len(self.labelnames):
            msg = f"{self.name}: expected labels {self.labelnames}, got {values}"
            raise ValueError(msg)
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self._new()
        return child

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class LoopCounter(_Family[CounterChild]):
    def _new(self) -> CounterChild:
        return CounterChild()

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self.children.items()):
            fam.add_metric(list(key), child.value, created=child.created)
        yield fam


class LoopGauge(_Family[GaugeChild]):
    def _new(self) -> GaugeChild:
        return GaugeChild()

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self.children.items()):
            fam.add_metric(list(key), child.value)
        yield fam


class LoopHistogram(_Family[HistogramChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        names = [_le(b) for b in self.bounds] + ["+Inf"]
        for key, child in list(self.children.items()):
            total = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(names, child.counts, strict=True):
                total += count
                buckets.append((le, float(total)))
            fam.add_metric(list(key), buckets, child.sum)
            fam.add_sample(
                self.name + "_created", dict(zip(self.labelnames, key, strict=True)), child.created
            )
        yield fam


def _le(bound: float) -> str:
    """A bucket bound as prometheus-client writes it (``0.5``, ``1.0``, ``30.0``)."""
    return repr(float(bound))
