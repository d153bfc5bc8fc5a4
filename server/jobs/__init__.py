"""Asynchronous jobs for long videos (DESIGN 5)."""

from __future__ import annotations


def make_queue(settings):
    """Redis Streams when ``redis_url`` is set, else the in-process queue."""
    common = dict(result_ttl_s=settings.job_result_ttl_s, max_attempts=settings.job_max_attempts,
                  visibility_timeout_s=settings.job_visibility_timeout_s)
    if settings.redis_url:
        from framewise.server.jobs.redis_queue import RedisJobQueue

        return RedisJobQueue(settings.redis_url, prefix=settings.redis_prefix, **common)
    from framewise.server.jobs.memory_queue import MemoryJobQueue

    return MemoryJobQueue(**common)
