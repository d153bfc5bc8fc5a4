"""The error codes the gateway and the workers return, in one catalogue: ``code -> (statuses, meaning)``
(statuses ``()``: any, the web framework's own HTTP errors). docs/api.md's table is this catalogue
(``python -m framewise.server.error_codes`` prints it; tests/test_docs.py keeps them equal), and every code the source
returns is in it (the same test; :class:`server.errors.APIError` logs one that is not)."""

from __future__ import annotations

CODES: dict[str, tuple[tuple[int, ...], str]] = {
    "invalid_video": ((400,), "not a video Framewise accepts: unreadable, a container outside MP4/MOV, Matroska/WebM, AVI, MPEG-TS and raw H.264/HEVC (playlists, manifests and `ffconcat` lists included), no video stream, no decodable frame"),
    "invalid_image": ((400,), "not an image in an accepted format (JPEG/MPO, PNG, WebP, GIF, BMP), or a damaged one"),
    "invalid_sampling": ((400,), "`video_url` sampling the clip cannot give: `start` past the end, `end` ≤ `start`, more `num_frames` than the model's `max_frames`"),
    "unsupported_codec": ((400,), "the video codec is not supported"),
    "decode_timeout": ((400,), "decoding took longer than `--decode-timeout-s` (the decode worker is replaced)"),
    "decode_failed": ((400,), "the decoder crashed on this video (the decode worker is replaced) or could not decode it"),
    "fetch_failed": ((400, 504), "the media server could not be reached, answered other than 200 (206 to a ranged read), the transfer broke, or the bytes changed while the decoder read them in ranges (504 when the request's deadline had passed meanwhile)"),
    "url_not_allowed": ((400,), "the URL's host resolves only to refused addresses ([Fetching](#fetching)), a redirect leads there, too many redirects, a scheme other than http(s), or a `file://` URL outside `--allowed-local-media-path`"),
    "invalid_url": ((400,), "a media URL that cannot be parsed, a source that is none of http(s), `data:`, `file-<id>`, `file://`, or a `data:` URL that is not valid base64"),
    "context_length_exceeded": ((400,), "the prompt, visual tokens included, is longer than the model's context (`--max-model-len`); refused before any fetch when the videos' frames × tokens per frame alone exceed it"),
    "too_many_videos": ((400,), "more video parts than `max_videos_per_request`"),
    "too_many_images": ((400,), "more image parts than `max_images_per_request`"),
    "empty_file": ((400,), "an upload of zero bytes"),
    "invalid_messages": ((400,), "the model's chat template rejected the messages"),
    "unsupported_media_in_template": ((400,), "the chat template has no place for a video (image) part ([above](#media-the-chat-template-cannot-place))"),
    "unsupported_parameter": ((400,), "an OpenAI field Framewise does not implement, set to more than its no-op form: `response_format` other than `text`, `tools`, `tool_choice`, `functions`, `function_call`, `audio`, `prediction` ([Fields](#openai-fields))"),
    "invalid_request": ((400,), "any other input vLLM refuses"),
    "invalid_host_header": ((400,), "an HTTP/1.1 request without exactly one `Host` header (or any request with several)"),
    "invalid_api_key": ((401,), "no or a wrong `Authorization: Bearer` key on `/v1/*` (a request body is refused before it is read)"),
    "rate_limit_exceeded": ((429,), "the tenant's requests per window (`rpm`) are used up; `type` `rate_limit_exceeded`, `Retry-After` says when one leaves the window ([Tenants and quotas](#tenants-and-quotas))"),
    "concurrency_limit_exceeded": ((429,), "the tenant has `concurrent` POST requests in flight; `type` `rate_limit_exceeded`, `Retry-After`"),
    "job_quota_exceeded": ((429,), "the tenant has `jobs` jobs queued or running (`POST /v1/jobs`, or a completion that would run as a job); `type` `insufficient_quota`, `Retry-After`"),
    "storage_quota_exceeded": ((429,), "the upload would take the tenant's stored uploads past `storage_mb`; `type` `insufficient_quota`, `Retry-After`"),
    "model_not_found": ((404,), "`model` is not the served model"),
    "file_not_found": ((404,), "no such `file-<id>` (or it was deleted, expired, or is another tenant's)"),
    "job_not_found": ((404,), "no such job (or another tenant's)"),
    "not_found": ((404,), "no such route or playground asset"),
    "method_not_allowed": ((405,), "the route exists, the method does not"),
    "http_error": ((), "any other HTTP error raised by the web framework"),
    "request_timeout": ((408,), "a request head that did not arrive within `--header-timeout-s`, or a body with no bytes for `body_idle_timeout_s` (the connection is closed)"),
    "media_too_large": ((413,), "a video or image over `--max-video-mb` / `--max-image-mb` (declared, streamed, `data:` or `file://`)"),
    "file_too_large": ((413,), "an upload over `--max-upload-mb`"),
    "video_too_long": ((413,), "a video longer than `--max-duration-s` (stated or measured)"),
    "resolution_too_large": ((413,), "frames over `--max-pixels`, or an image header claiming a decompression bomb"),
    "request_too_large": ((413,), "a request body over its limit ([Limits](#limits))"),
    "invalid_parameter": ((422,), "schema validation, e.g. `min_tokens > max_tokens`, an empty `stop` string, a non-finite float, a `seed` outside 64 bits"),
    "overloaded": ((429, 503), "429: more than `--max-concurrent-requests` chat completions in flight; 503 (with `Retry-After`): request bodies in flight over `--max-body-in-flight-mb`, refused before reading"),
    "request_header_fields_too_large": ((431,), "a request head over `--max-header-kb`, or more than `max_headers` header lines"),
    "client_disconnected": ((499,), "the client went away (logged; the engine request is aborted)"),
    "cancelled": ((499,), "the job was cancelled (`DELETE /v1/jobs/{id}`, or its waiting client left)"),
    "engine_error": ((500,), "vLLM ended the request with `finish_reason: \"error\"`, or `EngineGenerateError`"),
    "internal_error": ((500,), "an unexpected error (logged with its traceback and request id)"),
    "retry_limit": ((500,), "a job given up after `job_max_attempts` attempts (dead-lettered)"),
    "engine_not_ready": ((503,), "the engine is not running yet; also `GET /ready`"),
    "engine_dead": ((503,), "the engine core process died (this request, `GET /health` and `GET /ready`); the gateway then exits with status 1"),
    "gateway_shutdown": ((503,), "a completion that runs as a job: this gateway is shutting down (SIGTERM, a rolling deploy) or its engine died; the error names the `job_id` (and `Location`), which runs on"),
    "request_aborted": ((503,), "vLLM aborted the request (not the client, not the timeout)"),
    "queue_unavailable": ((503,), "the job queue (Redis) does not answer: job routes and completions that would run as jobs (with `Retry-After`; `GET /ready` does not depend on it), or a queued completion's wait (naming its job)"),
    "fetch_timeout": ((504,), "fetching the media took longer than `--fetch-timeout-s`"),
    "timeout": ((504,), "the request passed `request_timeout_s` ([Request timeout](#request-timeout))"),
}


def markdown_table() -> str:
    """The catalogue as docs/api.md shows it."""
    lines = ["| status | code | meaning |", "|---|---|---|"]
    for code, (statuses, meaning) in CODES.items():
        lines.append(f"| {', '.join(map(str, statuses)) or 'any'} | `{code}` | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
