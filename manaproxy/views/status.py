"""`GET /status`: one self-contained HTML page for the people on call.

The page (`status.html`, with `status.css` and `status.js` inlined) holds no data: its script reads
`/v1/health`, `/v1/aliases` and `/v1/failures` every 2 s, and the `/v1/events` stream for changes in
between, sending the client key (asked for once, kept in the tab's `sessionStorage`) as a Bearer header —
never in a URL. So the page itself needs no key, and `auth.OPEN_PATHS` lets it through.

Rule of this module: the page can load nothing but itself and talk to nothing but manaproxy. Its
`Content-Security-Policy` allows the one inline style and the one inline script by their sha256 (computed
here, at import, from the very bytes served), `fetch` to the page's own origin, and `data:` images (the
favicon coloured by status); nothing else — no other script, style, frame, form target or origin.
"""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files

from aiohttp import web
from aiohttp.typedefs import Handler

from ..errors import ProxyError
from ..gateway import GATEWAY

_HERE = files(__package__)
_STYLE = _HERE.joinpath("status.css").read_text(encoding="utf-8")
_SCRIPT = _HERE.joinpath("status.js").read_text(encoding="utf-8")
_TEMPLATE = _HERE.joinpath("status.html").read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        f"script-src {_sha256(_SCRIPT)}",
        f"style-src {_sha256(_STYLE)}",
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def render(*, auth: bool) -> bytes:
    """The page; `auth` tells its script to ask for a key before it asks for anything else."""
    page = _TEMPLATE.replace("{auth}", "on" if auth else "off", 1)
    return page.replace("{style}", _STYLE, 1).replace("{script}", _SCRIPT, 1).encode("utf-8")


def page_handler() -> Handler:
    """The `GET /status` handler: the page as it is for the config in force, client keys on or off (a reload
    may turn them on or off: both variants are rendered once, one is picked per request)."""
    bodies = {auth: render(auth=auth) for auth in (False, True)}

    async def status_page(request: web.Request) -> web.Response:
        gateway = request.app[GATEWAY]
        if not gateway.config.server.status_page:
            raise ProxyError(404, "GET /status: the status page is off (server.status_page)", code="not_found")
        body = bodies[gateway.runtime.clients.enabled]
        return web.Response(body=body, content_type="text/html", charset="utf-8", headers=_HEADERS)

    return status_page
