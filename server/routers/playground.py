"""``GET /`` and ``GET /playground``: the playground page (static HTML + a small script, no build step).

The page is public; the API calls it makes carry the key the user types in (when the server has
``--api-key``). Not part of the OpenAPI document: these routes serve a page, not the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from framewise.server.errors import APIError

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/playground")
async def playground_page():
    return FileResponse(STATIC / "playground.html", media_type="text/html", headers=HEADERS)


@router.get("/playground/{name}")
async def playground_asset(name: str):
    if name not in ASSETS:
        raise APIError(404, "not_found", f"no playground asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
