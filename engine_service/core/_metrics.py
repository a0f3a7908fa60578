"""Metrics: Prometheus counters, gauges and histograms of this process, and OTLP when configured.

Names and labels follow Prometheus conventions (``machina_`` prefix, ``_total`` counters, base
units, ``_seconds`` durations). Labels have few values: no run id, workspace or free text, and a
tool is labelled by name only when it is one of the engine's own tools, MCP or ApiCall tools
(a client-defined tool is ``client``). Serve them with `serve` (``--metrics-listen``); with
``OTEL_METRICS_EXPORTER=otlp`` every measurement is sent over OTLP as well (`export_otlp`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client import Counter as _PromCounter
from prometheus_client import Gauge as _PromGauge
from prometheus_client import Histogram as _PromHistogram

log = logging.getLogger("machina.engine")

_S = TypeVar("_S")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_MODEL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)

_instruments: list[_Instrument] = []


class _Instrument:
    """One Prometheus metric, mirrored to an OpenTelemetry instrument once OTLP export is on."""

    def __init__(self, prom: Any, name: str, doc: str, unit: str) -> None:
        self._prom = prom
        self._name, self._doc, self._unit = name, doc, unit
        self._otel: Any = None
        self._labelnames: tuple[str, ...] = tuple(prom._labelnames)
        # Each series once looked up (labels take few values): Prometheus' own lookup takes a
        # lock and checks the labels on every call.
        self._children: dict[tuple[str, ...], Any] = {}
        _instruments.append(self)

    def _bind(self, meter: Any) -> None:  # overridden
        raise NotImplementedError

    def _attrs(self, labels: Sequence[str]) -> dict[str, str]:
        return dict(zip(self._labelnames, labels, strict=True))

    def _series(self, labels: tuple[str, ...]) -> Any:
        if not labels:
            return self._prom
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._prom.labels(*labels)
        return child


class Counter(_Instrument):
    def __init__(self, name: str, doc: str, labels: Sequence[str] = (), unit: str = "") -> None:
        super().__init__(_PromCounter(name, doc, labels), name, doc, unit)

    def _bind(self, meter: Any) -> None:
        # OpenTelemetry names counters without the suffix; a Prometheus backend adds ``_total``.
        self._otel = meter.create_counter(self._name, unit=self._unit, description=self._doc)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self._series(labels).inc(amount)
        if self._otel is not None:
            self._otel.add(amount, self._attrs(labels))


class Gauge(_Instrument):
    def __init__(self, name: str, doc: str, labels: Sequence[str] = (), unit: str = "") -> None:
        super().__init__(_PromGauge(name, doc, labels), name, doc, unit)

    def _bind(self, meter: Any) -> None:
        self._otel = meter.create_up_down_counter(self._name, unit=self._unit, description=self._doc)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self._series(labels).inc(amount)
        if self._otel is not None:
            self._otel.add(amount, self._attrs(labels))

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        self.inc(*labels, amount=-amount)


class Histogram(_Instrument):
    def __init__(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = _LATENCY_BUCKETS,
        unit: str = "s",
    ) -> None:
        super().__init__(_PromHistogram(name, doc, labels, buckets=buckets), name, doc, unit)

    def _bind(self, meter: Any) -> None:
        self._otel = meter.create_histogram(self._name, unit=self._unit, description=self._doc)

    def observe(self, value: float, *labels: str) -> None:
        self._series(labels).observe(value)
        if self._otel is not None:
            self._otel.record(value, self._attrs(labels))


# -- the metrics ---------------------------------------------------------------------------------

RUNS_CREATED = Counter("machina_runs_created", "Runs created.", ["mode"])
RUNS_FINISHED = Counter(
    "machina_runs_finished",
    "Runs that ended, by final state and error code (empty when done).",
    ["state", "error_code"],
)
RUNS_PAUSED = Counter("machina_runs_paused", "Times a run paused, by reason.", ["reason"])
RUNS_RESUMED = Counter("machina_runs_resumed", "Times a run continued after a pause, by how.", ["how"])
RUNS_ACTIVE = Gauge("machina_runs_active", "Runs executing in this process now.")
# The shared work queue's depth is sum(enqueued) - sum(started) over the replicas.
RUNS_ENQUEUED = Counter("machina_runs_enqueued", "Runs this process put in the shared work queue.")
RUNS_DEQUEUED = Counter("machina_runs_dequeued", "Queued runs this process claimed and started.")
TURNS = Counter("machina_turns", "Model calls made: turns, and summaries of older turns.", ["provider"])
TURN_SECONDS = Histogram(
    "machina_turn_duration_seconds", "One turn: the model call and the tool calls it asked for.", ["provider"]
)
MODEL_SECONDS = Histogram(
    "machina_model_call_duration_seconds",
    "One model call, first request to last token.",
    ["provider", "outcome"],
    buckets=_MODEL_BUCKETS,
)
TOKENS = Counter("machina_model_tokens", "Model tokens, by direction (input, output).", ["provider", "type"])
COST = Counter("machina_model_cost_usd", "Model cost in US dollars at the configured prices.", ["provider"])
TOOL_CALLS = Counter(
    "machina_tool_calls", "Tool calls the model made, by tool and outcome.", ["tool", "outcome"]
)
TOOL_SECONDS = Histogram("machina_tool_call_duration_seconds", "Tool calls that ran.", ["tool"])
ACTIVE_STREAMS = Gauge("machina_active_streams", "Event streams (ExecuteRun, StreamRunEvents) open now.")
LEASE_TAKEOVERS = Counter(
    "machina_lease_takeovers", "Runs this process took over after their executor's lease expired."
)
LEASES_LOST = Counter("machina_leases_lost", "Runs this process stopped moving because another took them.")
HANDOFFS = Counter("machina_handoffs", "Runs handed to a runner, by result.", ["result"])
WEBHOOK_DELIVERIES = Counter(
    "machina_webhook_deliveries", "Webhook POSTs, by result (delivered, retry, failed).", ["result"]
)
STORAGE_SECONDS = Histogram(
    "machina_storage_operation_duration_seconds", "Storage operations.", ["operation"]
)
STORAGE_ERRORS = Counter("machina_storage_errors", "Storage operations that raised.", ["operation"])
AUTH_REFUSED = Counter("machina_auth_refused", "Requests refused for a missing or unknown key.", ["service"])


def tool_label(name: str, known: bool) -> str:
    """The ``tool`` label of a call: its name for a tool of the engine, else ``client``."""
    return name if known else "client"


def export_otlp(meter_provider: Any) -> None:
    """Mirror every measurement from now on to ``meter_provider`` (an SDK MeterProvider)."""
    meter = meter_provider.get_meter("machina")
    for instrument in _instruments:
        instrument._bind(meter)


def serve(listen: str, registry: CollectorRegistry = REGISTRY) -> int:
    """Serve ``/metrics`` on ``listen`` (HOST:PORT, port 0 picks one) in a thread; returns the port."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound, extra={"metrics_port": bound})
    return bound


_STORAGE_OPERATIONS = (
    "create_run",
    "read_spec",
    "read_state",
    "write_state",
    "write_segment",
    "commit",
    "read_segments",
    "drop_uncommitted",
    "repair_end",
    "put_blob",
    "get_blob",
    "put_shared",
    "get_shared",
    "list_runs",
    "list_workspaces",
    "put_if_absent",
    "acquire_lease",
    "renew_lease",
    "release_lease",
)


def instrument_storage(storage: _S) -> _S:
    """Time every storage operation of ``storage`` and count those that raise (in place)."""
    for operation in _STORAGE_OPERATIONS:
        method = getattr(storage, operation, None)
        if method is not None and not getattr(method, "_metered", False):
            # An operation set on the instance is kept; one of the class is looked up at each call
            # (so the class's own method is what runs, even if it changes later).
            own = vars(storage).get(operation) if hasattr(storage, "__dict__") else None
            try:
                setattr(storage, operation, _metered(storage, operation, own))
            except AttributeError:  # a storage that takes no attributes is served unmeasured
                return storage
    return storage


def _metered(storage: Any, operation: str, own: Any) -> Callable[..., Awaitable[Any]]:
    series = STORAGE_SECONDS._prom.labels(operation)
    errors = STORAGE_ERRORS._prom.labels(operation)
    cls = type(storage)

    async def call(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        method = own if own is not None else getattr(cls, operation).__get__(storage, cls)
        try:
            return await method(*args, **kwargs)
        except Exception:
            errors.inc()
            if STORAGE_ERRORS._otel is not None:
                STORAGE_ERRORS._otel.add(1, {"operation": operation})
            raise
        finally:
            elapsed = time.perf_counter() - started
            series.observe(elapsed)
            if STORAGE_SECONDS._otel is not None:
                STORAGE_SECONDS._otel.record(elapsed, {"operation": operation})

    call._metered = True  # type: ignore[attr-defined]
    return call
