"""FastAPI dependencies: services, settings, API-key auth (the tenant of the key: server/tenants.py).

The one bearer parser (:func:`bearer_token`) serves the route dependency here and the middlewares that
authenticate before a body is read (server/http_limits.py) and admit per tenant (server/admission.py)."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from framewise.server.errors import APIError
from framewise.server.tenants import KeyRing, Tenant

UNAUTHORIZED = "missing or invalid API key (Authorization: Bearer <key>)"


def get_services(request: Request):
    return request.app.state.services


def bearer_token(scope) -> bytes | None:
    """The raw bytes after ``Bearer `` in the first Authorization header of an ASGI scope (any bytes, never
    decoded); None without one or with another scheme."""
    for name, value in scope.get("headers", ()):
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


def keyring(services) -> KeyRing:
    """The services' key ring (made from the settings for an application built without one)."""
    ring = getattr(services, "tenants", None)
    if ring is None:
        ring = KeyRing(services.settings)
        services.tenants = ring
    return ring


def authenticate(scope, ring: KeyRing) -> Tenant | None:
    """The request's tenant: the one its middleware found (``scope["state"]["tenant"]``), else from its key."""
    tenant = scope.get("state", {}).get("tenant")
    return tenant if tenant is not None else ring.authenticate(bearer_token(scope))


def require_api_key(request: Request, services=Depends(get_services)) -> Tenant:
    """The caller's :class:`~server.tenants.Tenant` (401 without a valid key; development mode: ``default``)."""
    tenant = authenticate(request.scope, keyring(services))
    if tenant is None:
        raise APIError(401, "invalid_api_key", UNAUTHORIZED)
    request.scope.setdefault("state", {})["tenant"] = tenant
    return tenant


current_tenant = require_api_key


def check_model(services, model: str) -> None:
    """The one check of a request's ``model`` (chat completions, jobs, ``GET /v1/models/{id}``)."""
    if model != services.settings.model_name:
        raise APIError(404, "model_not_found", f"the model {model!r} does not exist", "model")


def check_parameters(body) -> None:
    """OpenAI fields Framewise cannot honour are refused, not dropped (chat completions and jobs)."""
    unsupported = body.unsupported_parameter()
    if unsupported:
        raise APIError(400, "unsupported_parameter", unsupported[1], unsupported[0])
