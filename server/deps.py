"""FastAPI dependencies: services, settings, API-key auth."""

from __future__ import annotations

import secrets

from fastapi import Depends, Request

from server.errors import APIError


def get_services(request: Request):
    return request.app.state.services


def require_api_key(request: Request, services=Depends(get_services)) -> None:
    keys = services.settings.api_keys
    if not keys:
        return
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(token.strip(), k) for k in keys):
        raise APIError(401, "invalid_api_key", "missing or invalid API key (Authorization: Bearer <key>)")
