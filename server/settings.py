"""Gateway settings: command-line flags over ``FRAMEWISE_*`` environment variables over defaults."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRAMEWISE_", extra="ignore")

    # model and engine
    model: str = ".cache/models/tc-llava-demo"
    served_model_name: str | None = None
    max_model_len: int = 4096
    enable_prefix_caching: bool = True
    max_videos_per_request: int = 4
    max_images_per_request: int = 4

    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: CommaList = Field(default_factory=list)
    max_concurrent_requests: int = 64
    request_timeout_s: float = 600.0
    log_level: str = "info"
    log_format: Literal["json", "text"] = "json"

    # media fetching
    max_video_mb: float = 256.0
    max_image_mb: float = 20.0
    max_upload_mb: float = 512.0
    # request bodies, counted while they stream in (server/http_limits.py): chat/jobs JSON (None: one
    # max_video_mb video as a base64 data: URL plus 1 MiB) and every route other than uploads and JSON
    max_json_body_mb: float | None = None
    max_body_kb: float = 1024.0
    fetch_timeout_s: float = 30.0
    max_redirects: int = 5
    allowed_media_hosts: CommaList = Field(default_factory=list)
    allowed_local_media_path: str | None = None
    files_dir: str = ".cache/files"

    # decoding
    max_duration_s: float = 2 * 3600.0
    max_pixels: int = 4096 * 4096
    decode_workers: int = 2
    decode_threads: int = 2
    decode_timeout_s: float = 60.0
    frame_cache_mb: float = 512.0

    # jobs (DESIGN 5): Redis Streams when a URL is set, else the in-process queue
    redis_url: str | None = Field(None, validation_alias=AliasChoices("FRAMEWISE_REDIS_URL", "REDIS_URL",
                                                                      "redis_url"))
    redis_prefix: str = "fw"
    consume: bool = False  # `serve` also runs a worker (always with the in-process queue)
    worker_concurrency: int = 2
    job_result_ttl_s: int = 24 * 3600
    job_visibility_timeout_s: float = 60.0
    job_heartbeat_s: float = 2.0
    job_max_attempts: int = 3
    # chat completions with a longer/larger video run as jobs (the client still gets a completion)
    queue_above_s: float | None = 600.0
    queue_above_mb: float | None = 128.0
    queue_keepalive_s: float = 5.0

    @field_validator("api_keys", "allowed_media_hosts", mode="before")
    @classmethod
    def _split_commas(cls, v):
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.rstrip("/").split("/")[-1]
