"""Gateway and worker settings: command-line flags over ``FRAMEWISE_*`` environment variables over defaults.

Every field is a flag of ``framewise serve`` and ``framewise worker`` (``--max-video-mb`` for ``max_video_mb``;
server/cli.py generates them from this class, descriptions included), so the two commands and the environment
never drift apart.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def _(default, description: str, **kw):
    """A field with its description (the flag's help)."""
    if callable(default):
        return Field(default_factory=default, description=description, **kw)
    return Field(default, description=description, **kw)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRAMEWISE_", extra="ignore")

    # model and engine
    model: str = _(".cache/models/tc-llava-demo", "checkpoint directory")
    served_model_name: str | None = _(None, "the model's name in the API (default: the directory's name)")
    max_model_len: int | None = _(None, "context length (tokens) of the engine (default: the checkpoint's, its "
                                  "LLM's max_position_embeddings)")
    enable_prefix_caching: bool = _(True, "vLLM's prefix cache (its own --[no-]enable-prefix-caching flag)")
    allow_untested_vllm: bool = _(False, "start on a vLLM release outside the plugin's supported range "
                                  "(framewise.model_plugins.SUPPORTED_VLLM), with a warning")
    max_videos_per_request: int = _(4, "video parts per request at most")
    max_images_per_request: int = _(4, "image parts per request at most")

    # HTTP
    host: str = _("127.0.0.1", "address to listen on")
    port: int = _(8000, "port to listen on")
    # tenants (server/tenants.py). Neither keys nor a keys file: development mode (one tenant, no limits)
    api_keys: CommaList = _(list, "accepted bearer keys: NAME:KEY for tenant NAME, a bare KEY for tenant default "
                                  "(repeatable; env: comma list)")
    api_keys_file: str | None = _(None, "keys file: `NAME KEY` or `NAME sha256:<hex>` lines with optional limit "
                                        "overrides (rpm= concurrent= jobs= storage_mb= retention_h= role=admin); "
                                        "re-read when it changes and on SIGHUP")
    admin_tenants: CommaList = _(list, "tenants with the admin role: they see every tenant's files and jobs "
                                       "(repeatable)")
    # each tenant's limits unless its keys-file line overrides them (0: none); enforced across replicas in Redis
    # when it is configured (server/quotas.py)
    tenant_rpm: int = _(6000, "requests per rate_limit_window_s per tenant (0: no limit)")
    rate_limit_window_s: int = _(60, "the window of tenant_rpm, seconds")
    tenant_concurrent: int = _(256, "POST requests in flight per tenant (0: no limit)")
    tenant_jobs: int = _(1000, "jobs queued or running per tenant (0: no limit)")
    tenant_storage_mb: float = _(100 * 1024.0, "stored upload bytes per tenant, MiB (0: no limit)")
    tenant_retention_h: float = _(30 * 24.0, "uploads expire after this many hours (0: kept)")
    files_sweep_s: float = _(600.0, "expired uploads are removed this often (and on uploads)")
    max_concurrent_requests: int = _(64, "chat requests in flight at most (429 beyond)")
    request_timeout_s: float = _(600.0, "a request's fetch, decode and generation together at most (504 beyond)")
    # HTTP edges (server/http_edges.py)
    max_header_kb: float = _(64.0, "request line + headers at most, KiB (431 beyond)")
    max_headers: int = _(100, "header lines per request at most (431 beyond)")
    header_timeout_s: float = _(15.0, "a request head must arrive within this of its first byte or of the "
                                      "connection opening (408 and close beyond)")
    keep_alive_timeout_s: int = _(5, "an idle keep-alive connection is closed after this")
    body_idle_timeout_s: float = _(30.0, "a body that stalls this long is answered 408 and its connection closed")
    # admission before buffering (server/admission.py). A data-URL chat body costs the gateway ~6.5x its size in
    # RSS at its peak (measured: 121 MiB for 18.7 MiB), so 512 MiB bounds that to ~3.3 GiB; one maximal body is
    # admitted whenever it would be alone
    max_body_in_flight_mb: float = _(512.0, "request body bytes in flight, all requests together, MiB; beyond: "
                                            "503 + Retry-After before reading")
    log_level: str = _("info", "debug, info, warning, error")
    log_format: Literal["json", "text"] = _("json", "json: one object per line with request/job ids; text: for "
                                                    "humans")

    # media fetching
    max_video_mb: float = _(256.0, "a video (URL, data: URL or upload) at most, MiB")
    max_image_mb: float = _(20.0, "an image at most, MiB")
    max_upload_mb: float = _(512.0, "an upload (POST /v1/files) at most, MiB")
    # request bodies, counted while they stream in (server/http_limits.py)
    max_json_body_mb: float | None = _(None, "chat/jobs JSON bodies at most, MiB (default: one max_video_mb video "
                                             "as a base64 data: URL plus 1 MiB)")
    max_body_kb: float = _(1024.0, "bodies of every other route at most, KiB")
    fetch_timeout_s: float = _(30.0, "a media fetch at most (504 fetch_timeout beyond)")
    job_fetch_timeout_s: float = _(300.0, "a job's media fetch at most (a long video from a slow origin)")
    job_fetch_attempts: int = _(3, "a job's transient fetch failures (timeouts, connection errors, origin 5xx/429) "
                                   "are tried this many times in all, with backoff")
    max_redirects: int = _(5, "redirects followed per fetch")
    range_reads_above_mb: float | None = _(
        32.0, "an http(s) video at least this large, from an origin that serves byte ranges with a strong "
              "validator, is read in ranges by the decoder (only the index and the packets it needs) instead of "
              "downloaded first; above --max-video-mb: always download")
    allowed_media_hosts: CommaList = _(list, "hosts, host:port or CIDRs that may be fetched even if private "
                                             "(comma list; repeatable)")
    allowed_local_media_path: str | None = _(None, "a directory whose files file:// URLs may name")
    files_dir: str = _(".cache/files", "uploads and the media spool (shared by replicas and workers)")

    # decoding
    max_duration_s: float = _(2 * 3600.0, "a video at most, seconds (413 beyond)")
    max_pixels: int = _(4096 * 4096, "a frame at most, pixels (413 beyond)")
    decode_workers: int = _(2, "decode processes")
    decode_threads: int = _(2, "decoders working on one video in parallel")
    decode_timeout_s: float = _(60.0, "a video's decode at most")
    video_seek: Literal["exact", "keyframe"] | None = _(
        None, "default video_url.seek: exact frames, or the nearest keyframe inside each sampled segment "
              "(default: the checkpoint's config.json video_seek, else exact)")
    frame_cache_mb: float = _(512.0, "decoded-frame cache, MiB")
    shared_frame_cache_mb: float = _(0.0, "decoded frames shared by replicas in files_dir/frame-cache, MiB (0: off; "
                                          "for several gateways on one files volume)")

    # jobs (docs/design.md 5): Redis Streams when a URL is set, else the in-process queue
    redis_url: str | None = _(None, "job queue (env also REDIS_URL; default: the in-process queue)",
                              validation_alias=AliasChoices("FRAMEWISE_REDIS_URL", "REDIS_URL", "redis_url"))
    redis_prefix: str = _("fw", "prefix of the queue's Redis keys")
    consume: bool = _(False, "serve: also run a job worker in this process (always with the in-process queue)")
    worker_concurrency: int = _(2, "jobs a worker runs at once")
    job_result_ttl_s: int = _(24 * 3600, "finished jobs and their results are kept this long")
    job_visibility_timeout_s: float = _(60.0, "a running job whose worker stopped heart-beating this long is "
                                              "taken over by another")
    job_heartbeat_s: float = _(2.0, "a worker's heartbeat interval")
    job_max_attempts: int = _(3, "attempts of a job before it is dead-lettered")
    queue_above_s: float | None = _(600.0, "chat completions whose video lasts longer run as jobs (the client "
                                           "still gets a completion)")
    queue_above_mb: float | None = _(128.0, "... or whose video is larger than this, MiB (to download: a video "
                                            "read in ranges goes by its duration)")
    queue_keepalive_s: float = _(5.0, "a queued stream's keep-alive comment interval")
    queued_wait_s: float = _(3600.0, "a chat completion run as a job keeps its connection waiting this long at "
                                     "most (from when it is queued); then 504 naming the job, which runs on")

    @field_validator("api_keys", "admin_tenants", "allowed_media_hosts", mode="before")
    @classmethod
    def _split_commas(cls, v):
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list | tuple):  # flags are repeatable and each may be a comma list
            return [s.strip() for item in v for s in str(item).split(",") if s.strip()]
        return v

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.rstrip("/").split("/")[-1]
