"""``GET /metrics``: the sidecar's numbers in Prometheus' text format, guarded like the admin API.

Nothing here runs on the request path. Counters and histograms of calls, feedback, adapter changes and optimizer
runs are updated from the rows the store has just committed (:meth:`Metrics.committed`, in the writer thread);
gauges (queue depth, the reward of each version, what the policy serves) are read when Prometheus scrapes, in a
worker thread, through the store writer's cursor.

===============================================  ===========================================================
``lightwire_calls_total``                        the agents' calls by ``route``, ``model``, ``status``, ``version``
``lightwire_call_duration_seconds``              a call's whole time as the client saw it, by ``route``
``lightwire_time_to_first_chunk_seconds``        streams: until the first chunk reached the client, by ``route``
``lightwire_added_latency_seconds``              a call's time minus the backend's (from sending it the request
                                                 to its response's last byte), by ``route`` and ``stream``
``lightwire_spans_written_total``                spans committed to the store
``lightwire_store_pending_rows``                 rows waiting in the store's write queue
``lightwire_store_memory_bytes``                 DuckDB's memory by ``tag`` (``art_index``, ``base_table``, ...)
                                                 as its writer last trimmed it (every 10 s)
``lightwire_store_rejected_rows_total``          rows the store refused (set aside next to the database)
``lightwire_store_write_failures_total``         attempts to write a batch that failed (each is tried again)
``lightwire_store_writer_restarts_total``        restarts of the writer thread's loop after an exception
``lightwire_store_catch_ups_total``              times the write queue reached 5,000 rows (the nice writer thread fell
                                                 behind) and a writer thread at the loop's priority took over
``lightwire_store_unavailable_total``            waits for the store that timed out: requests answered 503
``lightwire_store_reattached_total``             times the writer detached the store's file and attached it again,
                                                 freeing what DuckDB had loaded of it (store.writer.REATTACH_ROWS)
``lightwire_feedback_total``                     feedback rows by ``source`` (``api``, ``hook:...``)
``lightwire_reward_mean``                        mean credited reward by adapter ``version`` (as ``/admin/stats``)
``lightwire_rewarded_calls``                     how many calls that mean is over, by ``version``
``lightwire_adapter_transitions_total``          adapter registry changes by new ``status`` (``active``: swaps)
``lightwire_optimizer_runs_total``               finished optimizer runs by ``status``
``lightwire_active_version_info``                1 for the ``version`` served to new sessions
``lightwire_canary_fraction``                    the share of new sessions the canary ``version`` gets
===============================================  ===========================================================
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from proxy.backends import BACKENDS
from proxy.config import Config
from proxy.relay import WIRES
from store import stats
from store.adapters import Adapter
from store.feedback import Feedback
from store.runs import Run
from store.spans import SAMPLE_SOURCE, Span
from store.writer import Record, Writer

# Seconds; a local model answers in tens of milliseconds to tens of seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Seconds; Lightwire adds a fraction of a millisecond to a call, more when it waits (store, policy, a swap).
ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
ROUTES = {operation: "/v1" + wire.path for operation, wire in WIRES.items()}


class Metrics:
    """The sidecar's metrics, in a registry of its own (each app has one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            "lightwire_calls", "The agents' calls.", ["route", "model", "status", "version"], registry=r
        )
        self.duration = Histogram(
            "lightwire_call_duration_seconds",
            "A call's whole time as its client saw it.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.first_chunk = Histogram(
            "lightwire_time_to_first_chunk_seconds",
            "Streams: time until the first chunk reached the client.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.added = Histogram(
            "lightwire_added_latency_seconds",
            "A call's time minus the backend's: from sending it the request to its response's last byte.",
            ["route", "stream"],
            buckets=ADDED_BUCKETS,
            registry=r,
        )
        self.spans = Counter("lightwire_spans_written", "Spans committed to the store.", registry=r)
        self.feedback = Counter("lightwire_feedback", "Feedback rows received, by source.", ["source"], registry=r)
        self.transitions = Counter(
            "lightwire_adapter_transitions",
            "Adapter registry changes by the status they set (active: a swap to that version).",
            ["status"],
            registry=r,
        )
        self.runs = Counter("lightwire_optimizer_runs", "Finished optimizer runs, by status.", ["status"], registry=r)

    def committed(self, records: Sequence[Record]) -> None:
        """Count the rows of one committed batch (called in the store's writer thread)."""
        for record in records:
            if isinstance(record, Span):  # a model call, or another /v1/ path (proxy.passthrough), by operation
                self._span(record)
            elif isinstance(record, Feedback):
                self.feedback.labels(record.source).inc()
            elif isinstance(record, Adapter):
                self.transitions.labels(record.status).inc()
            elif isinstance(record, Run) and record.status != "running":
                self.runs.labels(record.status).inc()

    def _span(self, span: Span) -> None:
        self.spans.inc()
        if span.session_source == SAMPLE_SOURCE:
            return
        route = ROUTES.get(span.operation_name, span.operation_name)
        status = str(span.http_status) if span.http_status is not None else "none"
        version = span.adapter_version or stats.BASE
        self.calls.labels(route, span.request_model or "", status, version).inc()
        self.duration.labels(route).observe(span.duration_ms / 1000)
        if span.time_to_first_chunk_ms is not None:
            self.first_chunk.labels(route).observe(span.time_to_first_chunk_ms / 1000)
        if span.upstream_duration_ms is not None:
            stream = "true" if span.request_stream else "false"
            self.added.labels(route, stream).observe((span.duration_ms - span.upstream_duration_ms) / 1000)


METRICS = web.AppKey("metrics", Metrics)


def add_routes(app: web.Application, *, writer: web.AppKey[Writer], config: web.AppKey[Config]) -> None:
    """Give ``app`` its metrics (``app[METRICS]``) and the ``/metrics`` route."""
    metrics = app[METRICS] = Metrics()
    metrics.registry.register(_Scraped(app, writer=writer, config=config))

    async def get_metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", get_metrics)


class _Scraped(Collector):
    """What is read at scrape time: the store's queue, rewards per version, the versions being served."""

    def __init__(self, app: web.Application, *, writer: web.AppKey[Writer], config: web.AppKey[Config]) -> None:
        self._app = app
        self._writer = writer
        self._config = config

    def describe(self) -> list[Metric]:
        return []  # read from the app when it runs; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        writer, config = self._app.get(self._writer), self._app[self._config]
        if writer is None:  # not started yet
            return
        yield GaugeMetricFamily(
            "lightwire_store_pending_rows", "Rows waiting in the store's write queue.", writer.pending
        )
        memory = GaugeMetricFamily(
            "lightwire_store_memory_bytes", "DuckDB's memory by tag, as the writer last trimmed it.", labels=["tag"]
        )
        for tag, used in writer.memory.items():
            memory.add_metric([tag], used)
        yield memory
        store_counts = (
            ("lightwire_store_rejected_rows", "Rows the store refused (kept in <db>.rejected.jsonl).", writer.rejected),
            ("lightwire_store_write_failures", "Attempts to write a batch that failed (tried again).", writer.failures),
            ("lightwire_store_writer_restarts", "Restarts of the writer thread after an exception.", writer.restarts),
            (
                "lightwire_store_catch_ups",
                "Times the store's queue reached CATCH_UP_FROM rows and a writer at full priority took over.",
                writer.catch_ups,
            ),
            ("lightwire_store_unavailable", "Waits for the store that timed out (answered 503).", writer.unavailable),
            (
                "lightwire_store_reattached",
                "Times the writer attached the store's file again, freeing what DuckDB had loaded of it.",
                writer.reattached,
            ),
        )
        for name, documentation, value in store_counts:
            yield CounterMetricFamily(name, documentation, value)
        with writer.cursor() as con:
            found = stats.collect(con, policy=config.credit_policy, discount=config.discount)
        mean = GaugeMetricFamily(
            "lightwire_reward_mean",
            "Mean credited reward of the calls each adapter version served.",
            labels=["version"],
        )
        count = GaugeMetricFamily("lightwire_rewarded_calls", "Rewarded calls, by adapter version.", labels=["version"])
        for group in found.by_adapter:
            if group.mean_reward is not None:
                mean.add_metric([group.key], group.mean_reward)
            count.add_metric([group.key], group.rewarded)
        yield mean
        yield count
        backends = self._app.get(BACKENDS)
        policy = backends.policy if backends is not None else None
        if policy is not None:
            active = GaugeMetricFamily(
                "lightwire_active_version_info", "1 for the version served to new sessions.", labels=["version"]
            )
            active.add_metric([policy.active.label], 1)
            yield active
            canary = GaugeMetricFamily(
                "lightwire_canary_fraction", "The share of new sessions the canary version gets.", labels=["version"]
            )
            if policy.canary is not None:
                canary.add_metric([policy.canary.label], policy.canary_fraction)
            yield canary
