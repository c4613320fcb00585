"""Metrics: counters, gauges and histograms, and their Prometheus text exposition.

Owns: the metric types, a `Registry` that renders every metric in the Prometheus
text format version 0.0.4 (``text/plain; version=0.0.4``), and `GatewayMetrics`,
the gateway's named metrics (the operators' reference is its docstring).

Does not own: serving the text (that is `gateway.admin`), or deciding when to
observe (the server and its pipeline stages do). This module does no I/O, so it
can be used and tested anywhere.

Why not the ``prometheus_client`` package: no new third-party dependency for a
few hundred lines, and two properties the gateway needs that it does not give by
default:

- **Bounded cardinality.** Label values come from request data (application,
  method, unit), so garbage input must not grow memory. Each metric holds at most
  `Registry.max_series` label combinations (10,000 by default). Once full, an
  observation with a new combination is folded into one overflow series whose
  every label is ``"_other"`` (no directory name can start with ``_``), and
  ``psngw_metrics_overflow_total{metric=...}`` rises by one per folded
  observation. A label value longer than `MAX_LABEL_VALUE_LENGTH` characters, or
  not encodable as UTF-8, is folded the same way: it is garbage, not a name.
- **Fixed label names.** A metric's label names are set when it is created; an
  observation with any other set of names raises `ValueError` (a programming
  error, found by the first test that exercises the call).

Thread-safe: each metric has its own lock, held only for the dictionary update,
so observing from the event loop and from worker threads is safe. The hot path
(known label combination) is a tuple build, one dict lookup and one add under the
lock: see `bench_observations` for the measured cost.
"""

from __future__ import annotations

import math
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from itertools import pairwise
from operator import itemgetter
from typing import Any, ClassVar, Final

from gateway import __version__

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_LATENCY_BUCKETS",
    "MAX_LABEL_VALUE_LENGTH",
    "OVERFLOW_LABEL_VALUE",
    "POLICY_DECISION_BUCKETS",
    "BoundCounter",
    "BoundGauge",
    "BoundHistogram",
    "Counter",
    "GatewayMetrics",
    "Gauge",
    "Histogram",
    "Registry",
    "bench_observations",
]

#: The HTTP Content-Type of `Registry.expose` output.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Latency buckets in seconds, from 50 microseconds to 30 seconds (``+Inf`` is implicit).
DEFAULT_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: Finer buckets for policy decisions, served from a precomputed structure in microseconds.
POLICY_DECISION_BUCKETS: Final[tuple[float, ...]] = (
    0.000001,
    0.0000025,
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.01,
    0.1,
)

#: The value of every label of the overflow series.
OVERFLOW_LABEL_VALUE: Final = "_other"

#: Longer label values are folded into the overflow series.
MAX_LABEL_VALUE_LENGTH: Final = 256

_DEFAULT_MAX_SERIES: Final = 10_000
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

_Key = tuple[str, ...]


# -- text format helpers --------------------------------------------------------


def _escape_help(text: str) -> str:
    """HELP docstrings: backslash and line feed are escaped (0.0.4)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(value: str) -> str:
    """Label values: backslash, double quote and line feed are escaped (0.0.4)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    """A sample value as Go's ParseFloat reads it: integers without a fraction, ``+Inf``/``-Inf``/``NaN``."""
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


def _label_pairs(names: Sequence[str], values: Sequence[str]) -> str:
    """``a="x",b="y"`` (values escaped), or ``""`` when there are no labels."""
    return ",".join([f'{n}="{_escape_label_value(v)}"' for n, v in zip(names, values, strict=True)])


def _key_getter(names: tuple[str, ...]) -> Callable[[dict[str, str]], _Key]:
    """A function from a labels dict to the series key (the values in label-name order); KeyError if one is missing."""
    if not names:
        return lambda labels: ()
    if len(names) == 1:
        only = names[0]
        return lambda labels: (labels[only],)
    getter: Callable[[dict[str, str]], _Key] = itemgetter(*names)  # a tuple for two or more names
    return getter


def _is_acceptable_label_value(value: object) -> bool:
    if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE_LENGTH:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a surrogateescape decode
        return False
    return True


# -- metrics --------------------------------------------------------------------


class _Metric:
    """What every metric shares: name, help, fixed label names, a lock, and bounded series."""

    kind: ClassVar[str] = "untyped"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        *,
        max_series: int,
        on_overflow: Callable[[str], None] | None,
    ) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"metric name {name!r} is not a valid Prometheus name")
        if not isinstance(help, str):
            raise ValueError(f"{name}: help must be a string")
        names = tuple(labels)
        for label in names:
            if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"{name}: label name {label!r} is not valid")
        if len(set(names)) != len(names):
            raise ValueError(f"{name}: label names repeat: {names}")
        if max_series < 1:
            raise ValueError(f"{name}: max_series must be at least 1")
        self.name = name
        self.help = help
        self.label_names: tuple[str, ...] = names
        self._max_series = max_series
        self._on_overflow = on_overflow
        self._overflow_key: _Key = (OVERFLOW_LABEL_VALUE,) * len(names)
        self._lock = threading.Lock()
        self._label_count = len(names)
        self._values_of = _key_getter(names)

    # The hot path: turn **labels into the series key, or raise ValueError.
    def _key(self, labels: dict[str, str]) -> _Key:
        if len(labels) != self._label_count:
            raise ValueError(f"{self.name}: expected labels {list(self.label_names)}, got {sorted(labels)}")
        try:
            return self._values_of(labels)
        except KeyError:
            raise ValueError(f"{self.name}: expected labels {list(self.label_names)}, got {sorted(labels)}") from None

    def _admit(self, key: _Key, series_count: int) -> tuple[_Key, bool]:
        """For a key not yet present (lock held): the key to use, and whether it overflowed."""
        if series_count < self._max_series and all(_is_acceptable_label_value(v) for v in key):
            return key, False
        if not all(isinstance(v, str) for v in key):
            raise ValueError(f"{self.name}: label values must be strings, got {key!r}")
        return self._overflow_key, True

    def _overflowed(self) -> None:
        if self._on_overflow is not None:
            self._on_overflow(self.name)

    def sample_names(self) -> tuple[str, ...]:
        """The sample names this metric writes (a histogram writes three)."""
        return (self.name,)

    def render(self) -> Iterator[str]:
        """The HELP and TYPE lines, then one line per sample (each without its line feed)."""
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.kind}"
        yield from self._render_samples()

    def _render_samples(self) -> Iterator[str]:
        raise NotImplementedError


class _ScalarMetric(_Metric):
    """A metric with one float per series (counter, gauge)."""

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        *,
        max_series: int,
        on_overflow: Callable[[str], None] | None,
    ) -> None:
        super().__init__(name, help, labels, max_series=max_series, on_overflow=on_overflow)
        # An unlabelled metric shows 0 from the start, so "nothing yet" is not "no data".
        self._values: dict[_Key, float] = {} if self.label_names else {(): 0.0}

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        self._add_key(amount, self._key(labels))

    def _add_key(self, amount: float, key: _Key) -> None:
        with self._lock:
            values = self._values
            if key in values:
                values[key] += amount
                return
            key, overflowed = self._admit(key, self._series_count())
            values[key] = values.get(key, 0.0) + amount
        if overflowed:
            self._overflowed()

    def _series_count(self) -> int:
        return len(self._values)

    def value(self, **labels: str) -> float:
        """The current value of one series (0 if it was never observed); for tests and health checks."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def remove(self, **labels: str) -> None:
        """Forget one series (a peer force left the directory, a certificate was retired)."""
        key = self._key(labels)
        with self._lock:
            self._values.pop(key, None)

    def _snapshot(self) -> list[tuple[_Key, float]]:
        with self._lock:
            return sorted(self._values.items())

    def _render_samples(self) -> Iterator[str]:
        names = self.label_names
        for key, value in self._snapshot():
            block = "{" + _label_pairs(names, key) + "}" if key else ""
            yield f"{self.name}{block} {_format_value(value)}"


class Counter(_ScalarMetric):
    """A value that only goes up: calls, refusals, records. Created by `Registry.counter`."""

    kind: ClassVar[str] = "counter"

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        """Add `amount` (not negative) to the series named by `labels`."""
        if not amount >= 0:  # also refuses NaN
            raise ValueError(f"{self.name}: a counter cannot go down (amount {amount!r})")
        self._add_key(amount, self._key(labels))

    def labels(self, **labels: str) -> BoundCounter:
        """The series named by `labels`, bound once: its `inc` skips building the key.

        For label values known in advance (a listener, a stage name). Label names are checked now.
        """
        return BoundCounter(self, self._key(labels))


class Gauge(_ScalarMetric):
    """A value that goes up and down, or is read at scrape time. Created by `Registry.gauge`."""

    kind: ClassVar[str] = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        *,
        max_series: int,
        on_overflow: Callable[[str], None] | None,
    ) -> None:
        super().__init__(name, help, labels, max_series=max_series, on_overflow=on_overflow)
        self._functions: dict[_Key, Callable[[], float]] = {}

    def _series_count(self) -> int:
        return len(self._values) + len(self._functions)

    def set(self, value: float, /, **labels: str) -> None:
        """Set the series named by `labels` to `value` (replacing any function set for it)."""
        value = float(value)
        key = self._key(labels)
        with self._lock:
            if key in self._values:
                self._values[key] = value
                return
            self._functions.pop(key, None)
            key, overflowed = self._admit(key, self._series_count())
            self._values[key] = value
        if overflowed:
            self._overflowed()

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        """Add `amount` to the series named by `labels`."""
        self._add(float(amount), labels)

    def dec(self, amount: float = 1.0, /, **labels: str) -> None:
        """Subtract `amount` from the series named by `labels`."""
        self._add(-float(amount), labels)

    def labels(self, **labels: str) -> BoundGauge:
        """The series named by `labels`, bound once: its `inc` and `dec` skip building the key."""
        return BoundGauge(self, self._key(labels))

    def set_function(self, fn: Callable[[], float], /, **labels: str) -> None:
        """Read the series named by `labels` from `fn()` at each scrape.

        `fn` runs on the scraping thread (the admin listener renders in a worker
        thread, not on the event loop), under no lock of this module: it must be
        quick, must not block, and should only read plain values (an attribute,
        a ``len()``), not call into asyncio or other non-thread-safe objects. If
        it raises, the sample shows ``NaN`` (value unknown) and the scrape goes on.
        """
        key = self._key(labels)
        with self._lock:
            self._values.pop(key, None)
            if key not in self._functions:
                key, overflowed = self._admit(key, self._series_count())
                if overflowed:  # a function cannot be folded into a sum: the overflow series stays a value
                    self._values.setdefault(key, 0.0)
                else:
                    self._functions[key] = fn
            else:
                overflowed = False
                self._functions[key] = fn
        if overflowed:
            self._overflowed()

    def value(self, **labels: str) -> float:
        """The current value of one series, calling its function if it has one (0 if never set)."""
        key = self._key(labels)
        with self._lock:
            fn = self._functions.get(key)
            if fn is None:
                return self._values.get(key, 0.0)
        return float(fn())

    def replace(self, value: float, /, **labels: str) -> None:
        """Atomically drop every other series and set this one: for info-style gauges (policy version).

        A scrape never sees two versions at once, nor none.
        """
        value = float(value)
        key = self._key(labels)
        with self._lock:
            if not all(_is_acceptable_label_value(v) for v in key):
                if not all(isinstance(v, str) for v in key):
                    raise ValueError(f"{self.name}: label values must be strings, got {key!r}")
                key = self._overflow_key
            self._functions.clear()
            self._values = {key: value}

    def remove(self, **labels: str) -> None:
        """Forget one series, value or function."""
        key = self._key(labels)
        with self._lock:
            self._values.pop(key, None)
            self._functions.pop(key, None)

    def _snapshot(self) -> list[tuple[_Key, float]]:
        with self._lock:
            values = dict(self._values)
            functions = list(self._functions.items())
        for key, fn in functions:  # outside the lock: fn may be slow or observe this gauge
            try:
                values[key] = float(fn())
            except Exception:  # noqa: BLE001 - a broken callback must not break the scrape; NaN says "unknown"
                values[key] = math.nan
        return sorted(values.items())


class Histogram(_Metric):
    """Observations counted into fixed buckets, with their sum and count. Created by `Registry.histogram`."""

    kind: ClassVar[str] = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        *,
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
        max_series: int,
        on_overflow: Callable[[str], None] | None,
    ) -> None:
        super().__init__(name, help, labels, max_series=max_series, on_overflow=on_overflow)
        if "le" in self.label_names:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] == math.inf:
            bounds.pop()  # +Inf is always there
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one finite bucket")
        if any(math.isnan(b) or math.isinf(b) for b in bounds):
            raise ValueError(f"{name}: bucket bounds must be finite numbers")
        if any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"{name}: bucket bounds must increase strictly")
        self.buckets: tuple[float, ...] = tuple(bounds)
        self._le = (*(f'le="{_format_value(b)}"' for b in bounds), 'le="+Inf"')
        # Per series: an int count per bucket (not cumulative; the last is +Inf), then the float sum.
        self._series: dict[_Key, list[float]] = {}
        if not self.label_names:
            self._series[()] = [0] * (len(self.buckets) + 1) + [0.0]

    def observe(self, value: float, /, **labels: str) -> None:
        """Count `value` into its bucket (``le`` is inclusive) and into the sum."""
        self._observe_key(value, self._key(labels))

    def labels(self, **labels: str) -> BoundHistogram:
        """The series named by `labels`, bound once: its `observe` skips building the key.

        For label values known in advance (a stage name). Label names are checked now.
        """
        return BoundHistogram(self, self._key(labels))

    def _observe_key(self, value: float, key: _Key) -> None:
        # NaN (the one value unequal to itself; cheaper than math.isnan) would poison the sum.
        if value != value:  # noqa: PLR0124 - the NaN test, on purpose
            raise ValueError(f"{self.name}: cannot observe NaN")
        index = bisect_left(self.buckets, value)
        with self._lock:
            state = self._series.get(key)
            if state is None:
                key, overflowed = self._admit(key, len(self._series))
                state = self._series.get(key)
                if state is None:
                    state = self._series[key] = [0] * (len(self.buckets) + 1) + [0.0]
            else:
                overflowed = False
            state[index] += 1
            state[-1] += value
        if overflowed:
            self._overflowed()

    def time(self, **labels: str) -> _Timer:
        """A context manager that observes the seconds spent inside it."""
        return _Timer(self, labels)

    def remove(self, **labels: str) -> None:
        """Forget one series."""
        key = self._key(labels)
        with self._lock:
            self._series.pop(key, None)

    def count(self, **labels: str) -> int:
        """How many observations one series holds; for tests and health checks."""
        key = self._key(labels)
        with self._lock:
            state = self._series.get(key)
            return int(sum(state[:-1])) if state is not None else 0

    def sample_names(self) -> tuple[str, ...]:
        """``x_bucket``, ``x_sum`` and ``x_count``."""
        return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def _render_samples(self) -> Iterator[str]:
        with self._lock:
            snapshot = sorted((key, state.copy()) for key, state in self._series.items())
        name = self.name
        for key, state in snapshot:
            pairs = _label_pairs(self.label_names, key)  # escaped once per series, not once per bucket
            bucket = f"{name}_bucket{{{pairs}," if pairs else f"{name}_bucket{{"
            cumulative = 0
            for le, count in zip(self._le, state[:-1], strict=True):
                cumulative += int(count)
                yield f"{bucket}{le}}} {cumulative}"
            plain = f"{{{pairs}}}" if pairs else ""
            yield f"{name}_sum{plain} {_format_value(state[-1])}"
            yield f"{name}_count{plain} {cumulative}"


class BoundCounter:
    """One series of a `Counter`, from `Counter.labels`: the same bounds and overflow, no key to build."""

    __slots__ = ("_counter", "_key")

    def __init__(self, counter: Counter, key: _Key) -> None:
        self._counter = counter
        self._key = key

    def inc(self, amount: float = 1.0, /) -> None:
        """Add `amount` (not negative) to this series."""
        if not amount >= 0:  # also refuses NaN
            raise ValueError(f"{self._counter.name}: a counter cannot go down (amount {amount!r})")
        self._counter._add_key(amount, self._key)


class BoundGauge:
    """One series of a `Gauge`, from `Gauge.labels`, for `inc` and `dec` with no key to build."""

    __slots__ = ("_gauge", "_key")

    def __init__(self, gauge: Gauge, key: _Key) -> None:
        self._gauge = gauge
        self._key = key

    def inc(self, amount: float = 1.0, /) -> None:
        """Add `amount` to this series."""
        self._gauge._add_key(float(amount), self._key)

    def dec(self, amount: float = 1.0, /) -> None:
        """Subtract `amount` from this series."""
        self._gauge._add_key(-float(amount), self._key)


class BoundHistogram:
    """One series of a `Histogram`, from `Histogram.labels`: the same bounds and overflow, no key to build."""

    __slots__ = ("_histogram", "_key")

    def __init__(self, histogram: Histogram, key: _Key) -> None:
        self._histogram = histogram
        self._key = key

    def observe(self, value: float, /) -> None:
        """Count `value` into its bucket and into the sum of this series."""
        self._histogram._observe_key(value, self._key)


class _Timer:
    """Observes elapsed monotonic seconds into a histogram on exit."""

    __slots__ = ("_histogram", "_labels", "_start")

    def __init__(self, histogram: Histogram, labels: dict[str, str]) -> None:
        self._histogram = histogram
        self._labels = labels
        self._start = 0.0

    def __enter__(self) -> _Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._histogram.observe(time.perf_counter() - self._start, **self._labels)


# -- the registry ---------------------------------------------------------------


class Registry:
    """The metrics of one process, and their exposition.

    Names are unique, including the ``_bucket``/``_sum``/``_count`` samples a
    histogram writes. Each metric holds at most `max_series` label
    combinations; the registry's own ``psngw_metrics_overflow_total{metric}``
    counts observations folded into an overflow series.
    """

    def __init__(self, *, max_series: int = _DEFAULT_MAX_SERIES) -> None:
        if max_series < 1:
            raise ValueError("max_series must be at least 1")
        self.max_series = max_series
        self._lock = threading.Lock()
        self._metrics: list[_Metric] = []
        self._sample_names: set[str] = set()
        # Its one label is a metric name, fixed in code: it cannot be flooded, and it must not
        # report its own overflow (that would recurse).
        self.overflow = Counter(
            "psngw_metrics_overflow_total",
            "Observations folded into a metric's overflow series because it reached its label-combination bound"
            " or a label value was garbage.",
            ("metric",),
            max_series=max(max_series, 1000),
            on_overflow=None,
        )
        self._register(self.overflow)

    def _register(self, metric: _Metric) -> None:
        with self._lock:
            names = metric.sample_names()
            taken = [n for n in names if n in self._sample_names]
            if taken:
                raise ValueError(f"metric {metric.name!r}: sample name already registered: {taken[0]}")
            self._sample_names.update(names)
            self._metrics.append(metric)

    def _note_overflow(self, name: str) -> None:
        self.overflow.inc(metric=name)

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """A new counter; its name must end in ``_total`` (Prometheus convention)."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r}: a counter's name ends in _total")
        metric = Counter(name, help, labels, max_series=self.max_series, on_overflow=self._note_overflow)
        self._register(metric)
        return metric

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        """A new gauge."""
        metric = Gauge(name, help, labels, max_series=self.max_series, on_overflow=self._note_overflow)
        self._register(metric)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> Histogram:
        """A new histogram with fixed `buckets` (upper bounds; ``+Inf`` is added)."""
        metric = Histogram(
            name, help, labels, buckets=buckets, max_series=self.max_series, on_overflow=self._note_overflow
        )
        self._register(metric)
        return metric

    def expose(self) -> bytes:
        """Every metric in the Prometheus text format 0.0.4, UTF-8, in registration order.

        Series within a metric are sorted by label values, so repeated scrapes
        are reproducible. A labelled metric with no series yet shows only HELP and TYPE;
        an unlabelled one shows 0 from its creation.
        """
        with self._lock:
            metrics = list(self._metrics)
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render())
        lines.append("")  # the last line ends with a line feed
        return "\n".join(lines).encode("utf-8")


# -- the gateway's metrics ------------------------------------------------------


class GatewayMetrics:
    """The gateway's named metrics: the operators' reference.

    Every name starts with ``psngw_``. Labels come from the verified call (never
    from unverified claims, except where said); each metric is bounded to the
    registry's ``max_series`` label combinations, beyond which observations go
    to a series labelled ``"_other"`` and ``psngw_metrics_overflow_total`` rises.

    Calls

    ``psngw_calls_total{listener, origin_force, application, decision, status}`` counter
        Calls finished, one per call at this gateway. ``listener`` is ``local`` or
        ``peer``; ``origin_force`` the caller's force (from mTLS); ``application``
        the directory name (``unknown`` when the service did not route);
        ``decision`` ``allow``, ``deny`` or ``refused`` (refused before a policy
        decision); ``status`` the gRPC status name (``OK``, ``PERMISSION_DENIED``...).
    ``psngw_call_duration_seconds{listener, application}`` histogram
        Whole-call latency at this gateway, from first byte to status.
    ``psngw_calls_in_flight{listener}`` gauge
        Calls in progress now (compare with ``limits.max_concurrent_calls``).
    ``psngw_stage_duration_seconds{stage}`` histogram
        Time in each pipeline stage: ``peer-identity``, ``metadata``, ``token``,
        ``purpose``, ``route``, ``deadline``, ``rate-limit``, ``policy``,
        ``envelope`` (peer listener), ``forward`` (the upstream call: backend or
        relay) and ``audit`` (the durable record).
    ``psngw_refusals_total{stage, status}`` counter
        Calls refused, by the stage that refused and the status returned.
    ``psngw_rate_limited_total{origin_force, unit}`` counter
        Calls refused by a rate limit, by origin force and the caller's unit (the
        unit is a token claim: bounded like every label).

    Audit log

    ``psngw_audit_queue_depth`` gauge
        Records waiting for the next group commit.
    ``psngw_audit_commit_seconds`` histogram
        Duration of each group commit (write and fsync).
    ``psngw_audit_records_total`` counter
        Records made durable.
    ``psngw_audit_healthy`` gauge
        1 when the log can be written; 0 means the gateway is refusing traffic
        (fail closed). Alert on 0.

    Relay channels

    ``psngw_relay_messages_total`` counter
        Messages this gateway sent on relay channels that carried unary requests.
    ``psngw_relay_requests_total`` counter
        Unary requests sent in them: over the messages, the calls each message
        carried (``[limits] relay_batch_*`` packs calls on a busy channel).

    Policy

    ``psngw_policy_info{version}`` gauge
        Always 1; ``version`` is the digest of the policy in force. One series at a
        time (see `set_policy_version`).
    ``psngw_policy_reload_failures_total`` counter
        Policy reloads rejected by validation; the last good policy stays in force.
    ``psngw_policy_decision_seconds`` histogram
        Time to decide one call (buckets from 1 microsecond).

    Trust material

    ``psngw_certificate_expiry_days{certificate}`` gauge
        Days until a certificate expires (negative once expired). ``certificate``
        names it: ``tls``, ``signing``, ``ca:<force>``. Alert below 14.
    ``psngw_crl_usable{force}`` gauge
        1 when the force's CRL is present and inside nextUpdate plus grace; 0 means
        calls involving that force are refused.
    ``psngw_reloads_total{result}`` counter
        Reloads of certificates, CRLs and the directory; ``result`` is ``ok`` or
        ``failed`` (the previous material stays in force).

    Witnessing

    ``psngw_checkpoint_size`` gauge
        Records covered by the latest signed checkpoint of this force's log.
    ``psngw_checkpoint_cosignatures`` gauge
        Witness cosignatures gathered on that checkpoint.
    ``psngw_witness_quorum_required`` gauge
        Cosignatures needed for quorum.
    ``psngw_witness_quorum_reached`` gauge
        1 when the latest checkpoint has quorum. Alert when 0 for long.
    ``psngw_witness_conflicts_total{origin, kind}`` counter
        At this gateway's witness: submissions by a peer force's log, validly signed by
        its key, that showed ``kind``: ``rollback`` (a checkpoint smaller than one this
        witness cosigned), ``fork`` (that size with another root) or ``bad-proof`` (a
        consistency proof from the cosigned checkpoint that fails). ``origin`` is the
        log (``<force>.<network>/audit``). The evidence is kept in the witness database
        (``psngw audit witness-conflicts``). Any increase is an incident: alert on it.
    ``psngw_log_witness_disputes{witness}`` gauge
        At this force's log: 1 once that peer's witness has reported this log rolled
        back or forked (until the gateway restarts). Alert on 1 (see
        `watch_log_disputes`).

    Peers

    ``psngw_peer_circuit_open{force}`` gauge
        1 while calls to that force's gateway are short-circuited after failures.
    ``psngw_relay_channels_open{force}`` gauge
        Relay channels (``Relay/Mux`` streams) open to that force's gateway; 0 while idle, down, or relaying
        by ``Relay/Unary`` (``[limits] relay_channels = false``, or a peer without them).

    Process

    ``psngw_build_info{version}`` gauge
        Always 1; ``version`` is the psn-gateway version.
    ``psngw_metrics_overflow_total{metric}`` counter
        Observations folded into a metric's ``"_other"`` series (see above).
    """

    #: Pipeline stage names, as ``psngw_stage_duration_seconds`` labels them.
    STAGES: ClassVar[tuple[str, ...]] = (
        "peer-identity",
        "metadata",
        "token",
        "purpose",
        "route",
        "deadline",
        "rate-limit",
        "policy",
        "envelope",
        "forward",
        "audit",
    )

    def __init__(self, registry: Registry, *, version: str = __version__) -> None:
        self.registry = registry
        r = registry
        self.calls = r.counter(
            "psngw_calls_total",
            "Calls finished at this gateway.",
            ("listener", "origin_force", "application", "decision", "status"),
        )
        self.call_duration = r.histogram(
            "psngw_call_duration_seconds", "Whole-call latency at this gateway.", ("listener", "application")
        )
        self.calls_in_flight = r.gauge("psngw_calls_in_flight", "Calls in progress.", ("listener",))
        self.stage_duration = r.histogram(
            "psngw_stage_duration_seconds", "Time spent in each pipeline stage.", ("stage",)
        )
        self.refusals = r.counter(
            "psngw_refusals_total", "Calls refused, by refusing stage and status.", ("stage", "status")
        )
        self.rate_limited = r.counter(
            "psngw_rate_limited_total", "Calls refused by a rate limit.", ("origin_force", "unit")
        )
        self.audit_queue_depth = r.gauge("psngw_audit_queue_depth", "Audit records waiting for the next commit.")
        self.audit_commit = r.histogram("psngw_audit_commit_seconds", "Duration of each audit group commit.")
        self.audit_records = r.counter("psngw_audit_records_total", "Audit records made durable.")
        self.audit_healthy = r.gauge(
            "psngw_audit_healthy", "1 when the audit log can be written; 0 means traffic is refused."
        )
        self.relay_messages = r.counter(
            "psngw_relay_messages_total", "Messages sent on relay channels that carried unary requests."
        )
        self.relay_requests = r.counter("psngw_relay_requests_total", "Unary requests sent on relay channels.")
        self.policy_info = r.gauge("psngw_policy_info", "The policy version in force (value always 1).", ("version",))
        self.policy_reload_failures = r.counter(
            "psngw_policy_reload_failures_total", "Policy reloads rejected; the last good policy stays."
        )
        self.policy_decision = r.histogram(
            "psngw_policy_decision_seconds", "Time to decide one call.", buckets=POLICY_DECISION_BUCKETS
        )
        self.certificate_expiry_days = r.gauge(
            "psngw_certificate_expiry_days", "Days until the certificate expires.", ("certificate",)
        )
        self.crl_usable = r.gauge("psngw_crl_usable", "1 when the force's CRL is present and fresh.", ("force",))
        self.reloads = r.counter("psngw_reloads_total", "Reloads of certificates, CRLs and the directory.", ("result",))
        self.checkpoint_size = r.gauge("psngw_checkpoint_size", "Records covered by the latest signed checkpoint.")
        self.checkpoint_cosignatures = r.gauge(
            "psngw_checkpoint_cosignatures", "Witness cosignatures on the latest checkpoint."
        )
        self.witness_quorum_required = r.gauge("psngw_witness_quorum_required", "Cosignatures needed for quorum.")
        self.witness_quorum_reached = r.gauge(
            "psngw_witness_quorum_reached", "1 when the latest checkpoint has witness quorum."
        )
        self.witness_conflicts = r.counter(
            "psngw_witness_conflicts_total",
            "Submissions by a peer force's log that showed a rollback or a fork to this gateway's witness.",
            ("origin", "kind"),
        )
        self.log_witness_disputes = r.gauge(
            "psngw_log_witness_disputes",
            "1 once the peer's witness has reported this force's log rolled back or forked.",
            ("witness",),
        )
        self.peer_circuit_open = r.gauge(
            "psngw_peer_circuit_open", "1 while calls to the force's gateway are short-circuited.", ("force",)
        )
        self.relay_channels_open = r.gauge(
            "psngw_relay_channels_open", "Relay channels (Relay/Mux streams) open to the force's gateway.", ("force",)
        )
        self.build_info = r.gauge("psngw_build_info", "The psn-gateway version (value always 1).", ("version",))
        self.build_info.replace(1, version=version)

    def set_policy_version(self, version: str) -> None:
        """Show `version` as the one policy in force (``psngw_policy_info{version} 1``)."""
        self.policy_info.replace(1, version=version)

    def watch_log_disputes(self, status: Callable[[], Mapping[str, Any]]) -> None:
        """Read ``psngw_log_witness_disputes`` from the audit log's `status` at each scrape.

        One series per witness in ``status()["witnesses"]`` now: call it once the witnesses are
        registered. A series is 1 while that witness's ``equivocation`` is true.
        """
        for name in status()["witnesses"]:
            self.log_witness_disputes.set_function(partial(_disputed, status, name), witness=name)


def _disputed(status: Callable[[], Mapping[str, Any]], witness: str) -> float:
    entry = status()["witnesses"].get(witness)
    return 1.0 if entry is not None and entry["equivocation"] else 0.0


# -- benchmark ------------------------------------------------------------------


def bench_observations(n: int = 200_000) -> dict[str, float]:
    """The cost of one observation on the hot path, against a bare locked dict add (the floor).

    Figures (microseconds per operation, and ratios to the floor measured in the
    same run): ``counter_5_labels_us``, ``histogram_2_labels_us``,
    ``counter_no_labels_us``, ``floor_us``, ``*_vs_floor``, and the cost of one
    scrape of a metric at its series bound: ``expose_10k_counter_series_ms`` and
    ``expose_10k_histogram_series_ms`` (19 buckets: 210,000 lines, the worst
    case). `psngw bench` calls this; it is not a test.
    """
    registry = Registry()
    metrics = GatewayMetrics(registry, version="bench")
    lock = threading.Lock()
    floor: dict[tuple[str, ...], float] = {}

    def timed(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) / n * 1e6

    def run_floor() -> None:
        for _ in range(n):
            key = ("local", "surrey", "intel-search", "allow", "OK")
            with lock:
                floor[key] = floor.get(key, 0.0) + 1

    def run_counter() -> None:
        inc = metrics.calls.inc
        for _ in range(n):
            inc(listener="local", origin_force="surrey", application="intel-search", decision="allow", status="OK")

    def run_histogram() -> None:
        observe = metrics.call_duration.observe
        for _ in range(n):
            observe(0.0042, listener="local", application="intel-search")

    def run_plain() -> None:
        inc = metrics.audit_records.inc
        for _ in range(n):
            inc()

    floor_us = timed(run_floor)
    counter_us = timed(run_counter)
    histogram_us = timed(run_histogram)
    plain_us = timed(run_plain)

    def expose_ms(registry: Registry) -> float:
        start = time.perf_counter()
        registry.expose()
        return (time.perf_counter() - start) * 1e3

    wide = Registry()
    many = wide.counter("bench_total", "x", ("application", "method"))
    for i in range(10_000):
        many.inc(application=f"app-{i % 100}", method=f"/svc.S/M{i}")
    counter_expose_ms = expose_ms(wide)
    wide_h = Registry()
    many_h = wide_h.histogram("bench_seconds", "x", ("listener", "application"))
    for i in range(10_000):
        many_h.observe(0.001, listener="local", application=f"app-{i}")
    histogram_expose_ms = expose_ms(wide_h)
    return {
        "observations": float(n),
        "floor_us": floor_us,
        "counter_5_labels_us": counter_us,
        "histogram_2_labels_us": histogram_us,
        "counter_no_labels_us": plain_us,
        "counter_5_labels_vs_floor": counter_us / floor_us,
        "histogram_2_labels_vs_floor": histogram_us / floor_us,
        "counter_no_labels_vs_floor": plain_us / floor_us,
        "expose_10k_counter_series_ms": counter_expose_ms,
        "expose_10k_histogram_series_ms": histogram_expose_ms,
    }
