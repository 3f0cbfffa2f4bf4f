"""The web page (DESIGN §9): plain HTML, CSS and ES modules shipped in this package.

No build step and nothing fetched from the internet: the files under ``static/`` are served
as they are. Loading them needs no API key (they hold no data); every data call the page
makes goes to ``/v1`` with the key the user pasted, like any other client. The routes are
left out of the OpenAPI document: they are not part of the API contract.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import RedirectResponse, Response

PREFIX = "/ui"
STATIC = files(__name__).joinpath("static")

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}

# The page loads only its own files and talks only to its own origin; no inline script.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Content-Security-Policy": CSP}


def _walk(folder: Traversable, prefix: str = "") -> dict[str, Traversable]:
    found: dict[str, Traversable] = {}
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            found.update(_walk(entry, name + "/"))
        elif "." + name.rsplit(".", 1)[-1] in _TYPES:
            found[name] = entry
    return found


# Only the files shipped with the package are served: a request cannot name anything else.
ASSETS = _walk(STATIC)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse(PREFIX + "/", status_code=307)


@router.get(PREFIX)
async def ui_bare() -> RedirectResponse:
    return RedirectResponse(PREFIX + "/", status_code=307)


def _serve(name: str) -> Response:
    entry = ASSETS.get(name)
    if entry is None:
        raise HTTPException(404, f"no such file in the web page: {name}")
    kind = _TYPES["." + name.rsplit(".", 1)[-1]]
    return Response(entry.read_bytes(), media_type=kind, headers=HEADERS)


@router.get(PREFIX + "/")
async def index() -> Response:
    return _serve("index.html")


@router.get(PREFIX + "/{name:path}")
async def asset(name: str) -> Response:
    return _serve(name)
