"""FastAPI dependencies: services, settings, API-key auth."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from server.errors import APIError


def get_services(request: Request):
    return request.app.state.services


def _bearer_token(request: Request) -> bytes | None:
    """The raw bytes after ``Bearer `` in the first Authorization header (any bytes, never decoded)."""
    for name, value in request.scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def key_matches(token: bytes, keys: list[str]) -> bool:
    """Constant time over bytes for each key (every key is compared: no early exit)."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key.encode("utf-8"))
    return matched


def require_api_key(request: Request, services=Depends(get_services)) -> None:
    keys = services.settings.api_keys
    if not keys:
        return
    token = _bearer_token(request)
    if token is None or not key_matches(token, keys):
        raise APIError(401, "invalid_api_key", "missing or invalid API key (Authorization: Bearer <key>)")
