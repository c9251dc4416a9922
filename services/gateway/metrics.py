"""Prometheus metrics under vLLM's names, so existing dashboards work: latencies and token counts as
the gateway sees them, load and cache counters summed over the workers (asked of the Router when
/metrics is scraped). Every series is labelled with `model_name`.

With more than one gateway process, PROMETHEUS_MULTIPROC_DIR names a directory every process writes
its series to (prometheus_client's multiprocess mode), so whichever process answers a scrape shows
the sums over all of them."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from baton.services.gateway.generation import ChoiceEvent, ChoiceTimings
from baton.shared.rpc import router_pb2

_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                      7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0)  # fmt: skip

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set (before prometheus_client is imported) in every process of a multi-process gateway."""


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.ttft_s = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token, from the request's arrival.",
            labels, buckets=_LATENCY_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.itl_s = Histogram(
            "vllm:inter_token_latency_seconds", "Time between successive streamed pieces of a choice.",
            labels, buckets=_ITL_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.e2e_s = Histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to last token of each choice.",
            labels, buckets=_LATENCY_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of admitted requests.", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens of finished choices.", labels, registry=self.registry
        )
        self.request_success = Counter(
            "vllm:request_success", "Finished choices by finish reason.",
            [*labels, "finished_reason"], registry=self.registry,
        )  # fmt: skip
        self.cluster = _ClusterCollector(model_name)
        self.registry.register(self.cluster)

    def on_choice_finished(self, event: ChoiceEvent, timings: ChoiceTimings) -> None:
        model = self.model_name
        if timings.first_token_s is not None:
            self.ttft_s.labels(model).observe(timings.first_token_s - timings.start_s)
        for gap_s in timings.inter_token_s:
            self.itl_s.labels(model).observe(gap_s)
        if timings.last_token_s is not None:
            self.e2e_s.labels(model).observe(timings.last_token_s - timings.start_s)
        self.generation_tokens.labels(model).inc(event.usage.completion_tokens)
        self.request_success.labels(model, event.finish_reason or "unknown").inc()

    def on_prompts(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)

    def exposition(self, cluster: router_pb2.ClusterStats | None) -> bytes:
        """The text format, with the cluster's counters as of `cluster` (None: the Router did not
        answer; only the gateway's own series and `baton:router_up 0` are shown)."""
        self.cluster.stats = cluster
        registry = self.registry
        if os.environ.get(MULTIPROCESS_DIR_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self.cluster)
        return generate_latest(registry)


class _ClusterCollector:
    """The workers' counters, summed by the Router, as vLLM's gauge and counter names."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: router_pb2.ClusterStats | None = None

    def collect(self) -> Iterator[Metric]:
        model = [self.model_name]
        up = GaugeMetricFamily(
            "baton:router_up", "1 when the Router answered the last scrape.", labels=["model_name"]
        )
        up.add_metric(model, 0 if self.stats is None else 1)
        yield up
        s = self.stats
        if s is None:
            return
        usage = s.num_decode_held_blocks / s.num_decode_blocks if s.num_decode_blocks else 0.0
        gauges = [
            ("vllm:num_requests_running", "Requests in the workers' running batches.", s.num_running),
            ("vllm:num_requests_waiting", "Requests waiting for their first step.", s.num_waiting),
            ("vllm:kv_cache_usage_perc", "Fraction of the decode workers' KV blocks in use (0-1).", usage),
            ("vllm:gpu_cache_usage_perc", "Same as vllm:kv_cache_usage_perc (older name).", usage),
            ("baton:num_requests_reserved", "Requests whose KV is on its way to D.", s.num_reserved),
        ]  # fmt: skip
        counters = [
            ("vllm:num_preemptions", "Requests preempted (recomputed).", s.num_preemptions),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in prefix caches.", s.prefix_query_tokens),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix caches.", s.prefix_hit_tokens),
            ("baton:kv_transfers", "KV pushes from prefill to decode workers.", s.num_transfers),
            ("baton:kv_transfer_failures", "KV pushes that failed.", s.num_transfer_failures),
        ]  # fmt: skip
        for family, rows in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, doc, value in rows:
                metric = family(name, doc, labels=["model_name"])
                metric.add_metric(model, value)
                yield metric
        workers = GaugeMetricFamily("baton:workers", "Live workers by role.", labels=["model_name", "role"])
        workers.add_metric([*model, "decode"], s.num_decode_workers)
        workers.add_metric([*model, "prefill"], s.num_prefill_workers)
        workers.add_metric([*model, "unreachable"], s.num_unreachable_workers)
        yield workers
