"""Prometheus metrics of one engine, and the periodic log line.

Names follow the Prometheus conventions (base units, ``_total`` on counters, no colons);
the speculative counters mirror vLLM's ``vllm:spec_decode_*`` family.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger("outrider.engine")

# NOTE: a round's parts (draft, verify, overhead) on a GPU are a fraction of a millisecond to
# tens of milliseconds; the 0.3 ms overhead target needs buckets below 1 ms.
_ROUND_BUCKETS = (
    0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
_LATENCY_BUCKETS = (
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
    60.0,
)


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, lbl = self.registry, ("model_name",)
        self.model_name = model_name
        self.requests = Counter(
            "outrider_requests",
            "Finished requests by finish reason.",
            (*lbl, "finished_reason"),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "outrider_prompt_tokens", "Prompt tokens processed.", lbl, registry=r
        )
        self.generation_tokens = Counter(
            "outrider_generation_tokens", "Tokens generated.", lbl, registry=r
        )
        self.ttft = Histogram(
            "outrider_time_to_first_token_seconds",
            "Time to first token.",
            lbl,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "outrider_inter_token_latency_seconds",
            "Time between streamed tokens (a block of accepted tokens counts per token).",
            lbl,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "outrider_e2e_request_latency_seconds",
            "Request latency.",
            lbl,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("outrider_num_requests_running", "Running requests.", lbl, registry=r)
        self.waiting = Gauge("outrider_num_requests_waiting", "Waiting requests.", lbl, registry=r)
        self.kv_usage = Gauge(
            "outrider_kv_cache_usage_ratio",
            "Used fraction of the target KV cache.",
            lbl,
            registry=r,
        )
        self.num_drafts = Counter(
            "outrider_spec_decode_num_drafts",
            "Rounds in which a sequence had drafts.",
            lbl,
            registry=r,
        )
        self.num_draft_tokens = Counter(
            "outrider_spec_decode_num_draft_tokens", "Draft tokens proposed.", lbl, registry=r
        )
        self.num_accepted_tokens = Counter(
            "outrider_spec_decode_num_accepted_tokens", "Draft tokens accepted.", lbl, registry=r
        )
        self.accepted_per_pos = Counter(
            "outrider_spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by position in the draft.",
            (*lbl, "position"),
            registry=r,
        )
        self.fallback = Counter(
            "outrider_spec_decode_parallel_fallback",
            "Rounds drafted sequentially by a drafter that cannot draft in parallel, by reason.",
            (*lbl, "reason"),
            registry=r,
        )
        self.draft_length = Gauge(
            "outrider_spec_decode_draft_length",
            "Draft tokens per sequence chosen for the latest round (0 = plain decoding).",
            lbl,
            registry=r,
        )
        self.round_draft = Histogram(
            "outrider_spec_decode_round_draft_seconds",
            "Drafter forward time per drafting round.",
            lbl,
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.round_verify = Histogram(
            "outrider_spec_decode_round_verify_seconds",
            "Target forward time per round.",
            lbl,
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.round_overhead = Histogram(
            "outrider_spec_decode_round_overhead_seconds",
            "Round wall time minus the forward time on its critical path.",
            lbl,
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.worker_calls = Counter(
            "outrider_worker_calls",
            "Calls the router made to each worker group (frames on its stream).",
            (*lbl, "group"),
            registry=r,
        )
        self.worker_call_seconds = Counter(
            "outrider_worker_call_seconds",
            "Wall seconds of the router's calls to each worker group: part `worker` is the "
            "worker's own time (frame arrival to encoded reply), `wire` the rest (gRPC "
            "transport, the router's encoding and decoding).",
            (*lbl, "group", "part"),
            registry=r,
        )
        self.overlap_hits = Counter(
            "outrider_spec_decode_overlap_hits",
            "Sequences whose drafts prepared during verification were used.",
            lbl,
            registry=r,
        )
        self.overlap_misses = Counter(
            "outrider_spec_decode_overlap_misses",
            "Sequences whose prepared drafts were dropped (a rejection or a wrong bonus guess).",
            lbl,
            registry=r,
        )
        self.synthetic = Gauge(
            "outrider_spec_decode_synthetic_acceptance",
            "1 when drafts are accepted at synthetic rates (benchmarks; not the model's output).",
            lbl,
            registry=r,
        )
        self._synthetic = False
        self._window_start = time.monotonic()
        self._window_tokens = 0
        self._window_drafts = 0
        self._window_accepted = 0

    # -- hooks --------------------------------------------------------------------------------
    def on_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def on_tokens(self, num_tokens: int, seconds_since_last: float) -> None:
        if num_tokens <= 0:
            return
        self.generation_tokens.labels(self.model_name).inc(num_tokens)
        self._window_tokens += num_tokens
        per_token = seconds_since_last / num_tokens
        for _ in range(num_tokens):
            self.itl.labels(self.model_name).observe(per_token)

    def on_finished(self, reason: str, prompt_tokens: int, seconds: float) -> None:
        self.requests.labels(self.model_name, reason).inc()
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.e2e.labels(self.model_name).observe(seconds)

    def on_spec(self, num_draft: int, num_accepted: int) -> None:
        if num_draft <= 0:
            return
        m = self.model_name
        self.num_drafts.labels(m).inc()
        self.num_draft_tokens.labels(m).inc(num_draft)
        self.num_accepted_tokens.labels(m).inc(num_accepted)
        for pos in range(num_accepted):
            self.accepted_per_pos.labels(m, str(pos)).inc()
        self._window_drafts += 1
        self._window_accepted += num_accepted

    def on_round(
        self,
        k: int,
        draft_s: float,
        verify_s: float,
        overhead_s: float,
        overlap_hits: int = 0,
        overlap_misses: int = 0,
    ) -> None:
        m = self.model_name
        self.draft_length.labels(m).set(k)
        if draft_s > 0:
            self.round_draft.labels(m).observe(draft_s)
        self.round_verify.labels(m).observe(verify_s)
        self.round_overhead.labels(m).observe(overhead_s)
        if overlap_hits:
            self.overlap_hits.labels(m).inc(overlap_hits)
        if overlap_misses:
            self.overlap_misses.labels(m).inc(overlap_misses)

    def on_worker_calls(self, group: str, calls: int, call_s: float, worker_s: float) -> None:
        m = self.model_name
        self.worker_calls.labels(m, group).inc(calls)
        self.worker_call_seconds.labels(m, group, "worker").inc(worker_s)
        self.worker_call_seconds.labels(m, group, "wire").inc(max(call_s - worker_s, 0.0))

    def on_fallback_round(self, reason: str) -> None:
        self.fallback.labels(self.model_name, reason).inc()

    def set_synthetic(self, synthetic: bool) -> None:
        self._synthetic = synthetic
        self.synthetic.labels(self.model_name).set(1 if synthetic else 0)

    def set_load(self, running: int, waiting: int, kv_usage: float) -> None:
        m = self.model_name
        self.running.labels(m).set(running)
        self.waiting.labels(m).set(waiting)
        self.kv_usage.labels(m).set(kv_usage)

    # -- exposition and the log line ------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def log_line(self, running: int, waiting: int, kv_usage: float) -> str:
        now = time.monotonic()
        span = max(now - self._window_start, 1e-9)
        al = (
            f"{1 + self._window_accepted / self._window_drafts:.2f}"
            if self._window_drafts
            else "n/a"
        )
        line = (
            f"throughput {self._window_tokens / span:.1f} tok/s, running {running}, "
            f"waiting {waiting}, KV {100 * kv_usage:.1f}%, acceptance length {al}"
        )
        if self._synthetic:
            line += " (synthetic acceptance)"
        self._window_start, self._window_tokens = now, 0
        self._window_drafts = self._window_accepted = 0
        return line
