"""Prometheus metrics of the gateway (DESIGN 6), in the app's own registry."""

from __future__ import annotations

from prometheus_client import REGISTRY as VLLM_REGISTRY  # vLLM's engine metrics live in the default one
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from framewise.server.jobs.base import OUTCOMES

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("framewise_requests", "HTTP requests", ["route", "status"], registry=r)
        self.request_seconds = Histogram("framewise_request_seconds", "HTTP request latency", ["route"],
                                         buckets=LATENCY, registry=r)
        self.ttft = Histogram("framewise_time_to_first_token_seconds", "Time to first token", buckets=LATENCY,
                              registry=r)
        self.prompt_tokens = Counter("framewise_prompt_tokens", "Prompt tokens", registry=r)
        self.completion_tokens = Counter("framewise_completion_tokens", "Generated tokens", registry=r)
        self.fetch_bytes = Counter("framewise_fetch_bytes", "Media bytes fetched", registry=r)
        self.fetch_seconds = Histogram("framewise_fetch_seconds", "Media fetch time", buckets=LATENCY, registry=r)
        self.fetch_not_modified = Counter("framewise_fetch_not_modified",
                                          "Media URLs revalidated (HTTP 304) instead of downloaded again", registry=r)
        self.decode_seconds = Histogram("framewise_decode_seconds", "Video decode+sample time", buckets=LATENCY,
                                        registry=r)
        self.frames_sampled = Counter("framewise_frames_sampled", "Video frames given to the model", registry=r)
        self.frame_cache_hits = Counter("framewise_frame_cache_hits", "Sampled-frame cache hits", registry=r)
        self.frame_cache_lookups = Counter(
            "framewise_frame_cache_lookups", "Sampled-frame lookups by where the frames came from: memory (this "
            "replica), shared (another replica's, files_dir/frame-cache) or miss (decoded)", ["result"], registry=r)
        for result in ("memory", "shared", "miss"):
            self.frame_cache_lookups.labels(result)
        self.media_errors = Counter("framewise_media_errors", "Rejected media by code", ["code"], registry=r)
        self.inflight = Gauge("framewise_requests_in_flight", "Chat requests in flight", registry=r)
        self.body_bytes_in_flight = Gauge("framewise_request_body_bytes_in_flight",
                                          "Request body bytes reserved by admitted requests", registry=r)
        self.body_bytes_received = Counter("framewise_request_body_bytes",
                                           "Request body bytes handed to the application", registry=r)
        self.admission_refused = Counter("framewise_admission_refused",
                                         "Requests refused by admission before or while their body was read",
                                         ["code"], registry=r)
        # per tenant (server/tenants.py): the label is a configured tenant's name, else "other" -- never a key
        self.tenant_requests = Counter("framewise_tenant_requests", "Authenticated /v1 requests by tenant and status",
                                       ["tenant", "status"], registry=r)
        self.tenant_refused = Counter("framewise_tenant_limit_refusals",
                                      "Requests refused (429) because the tenant was over a limit: rpm, concurrent, "
                                      "jobs, storage", ["tenant", "limit"], registry=r)
        self.jobs = Counter("framewise_jobs", f"Job runs by outcome: {', '.join(OUTCOMES)} (server/jobs/worker.py)",
                            ["outcome"], registry=r)
        for outcome in OUTCOMES:  # every series from the start: increase() sees the first one
            self.jobs.labels(outcome)
        self.job_seconds = Histogram("framewise_job_seconds", "Job run time", buckets=LATENCY + (300, 600, 1800),
                                     registry=r)
        self.queue_depth = Gauge("framewise_job_queue_depth", "Jobs queued or running (queue-wide, exact)",
                                 registry=r)
        self.oldest_job_age = Gauge("framewise_job_oldest_age_seconds", "Age of the oldest unfinished job",
                                    registry=r)
        self.dead_letters = Gauge("framewise_job_dead_letters",
                                  "Jobs given up after their last attempt (queue-wide total)", registry=r)
        # counts kept by the queue and the decode pool, carried into Counters at scrape time (sync_total)
        self.job_reclaims = Counter("framewise_job_reclaims", "Jobs reclaimed from dead workers (this process)",
                                    registry=r)
        self.decode_restarts = Counter("framewise_decode_worker_restarts", "Decode workers replaced", registry=r)
        self._totals: dict[int, float] = {}
        self.engine_ready = Gauge("framewise_engine_ready", "1 while this process's vLLM engine is up", registry=r)
        self.queue_up = Gauge("framewise_queue_up", "1 while the job queue (Redis) answers this process", registry=r)

    def sync_total(self, counter: Counter, total: float) -> None:
        """Advance ``counter`` to ``total``, a running count kept elsewhere in this process (never backwards)."""
        seen = self._totals.get(id(counter), 0.0)
        if total > seen:
            counter.inc(total - seen)
        self._totals[id(counter)] = max(seen, total)

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(VLLM_REGISTRY)


async def refresh_queue_gauges(services) -> None:
    """Queue depth/age gauges are read from the queue at scrape time (gateway and worker /metrics)."""
    m = services.metrics
    m.sync_total(m.decode_restarts, services.pool.restarts)
    m.sync_total(m.job_reclaims, services.jobs.reclaims)
    m.engine_ready.set(1 if services.engine.ready else 0)
    up = False
    try:
        up = bool(await services.jobs.ping())
    except Exception:  # noqa: BLE001 - a ping that raises is a queue that does not answer
        up = False
    m.queue_up.set(1 if up else 0)
    if not up:  # the gauges keep their last values; framewise_queue_up says they are stale
        return
    try:
        m.queue_depth.set(await services.jobs.depth())
        m.oldest_job_age.set(await services.jobs.oldest_age())
        m.dead_letters.set(await services.jobs.dead_letters())
    except Exception:  # noqa: BLE001 - Redis went away between the ping and now: metrics still render
        pass
