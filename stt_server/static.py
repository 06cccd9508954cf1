"""The browser page and its assets, sans-IO: which paths exist, and the bytes and headers of each.

The page is plain files in the ``stt_server.web`` package (package data, so an installed server
serves them): ``/`` is ``index.html`` and ``/static/<name>`` the file ``<name>``. Only the paths
in :data:`ASSETS` are answered, by exact lookup of the request path as sent: no path is ever
joined or decoded, so ``..``, ``%2e%2e``, encoded slashes, backslashes, case or trailing-dot
tricks can only miss (404). The bytes come from ``importlib.resources``, read once on first use.

Cache policy: every file is ``Cache-Control: no-cache`` with a strong ``ETag`` (a hash of the
bytes), so a browser revalidates on each load and gets a body-less 304 while nothing changed.
The asset names are not versioned, so a ``max-age`` would let a browser pair a new
``index.html`` with an old ``app.js`` for that long after an upgrade; the files are a few KB, and
one revalidation per load is the price of never serving a mismatched page.

Security headers: the Content-Security-Policy allows scripts, styles and images from the page's
own origin only (no inline code, no eval, no plugins, no framing, no forms) and connections to
the same origin and the WebSocket of the same host (``ws://`` and ``wss://``, named explicitly
because older browsers do not let ``'self'`` cover WebSocket schemes).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from importlib import resources

import attrs

#: The package whose data files are the page.
PACKAGE = "stt_server.web"

#: Browsers insist on a JavaScript type for module scripts and worklets (with ``nosniff``).
_JS = "text/javascript; charset=utf-8"


@attrs.frozen
class Asset:
    """One servable file: its name in :data:`PACKAGE` and what it is."""

    resource: str
    content_type: str


#: URL path -> file. The whole allow-list: nothing else in the package is reachable.
ASSETS: Mapping[str, Asset] = {
    "/": Asset("index.html", "text/html; charset=utf-8"),
    "/static/style.css": Asset("style.css", "text/css; charset=utf-8"),
    "/static/app.js": Asset("app.js", _JS),
    "/static/stt-client.js": Asset("stt-client.js", _JS),
    "/static/audio.js": Asset("audio.js", _JS),
    "/static/pcm-worklet.js": Asset("pcm-worklet.js", _JS),
    "/static/transcript.js": Asset("transcript.js", _JS),
    "/static/icon.svg": Asset("icon.svg", "image/svg+xml"),
}

#: See the module docstring: revalidate every time, a 304 while the ETag matches.
CACHE_CONTROL = "no-cache"

#: A Host header that can go into the CSP as it is: a DNS name or IPv4 address, or an IPv6
#: literal in brackets, and an optional port. Anything else (``;``, spaces, quotes) is left out.
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


@attrs.frozen
class Reply:
    """What to answer to a GET of a page file; the caller frames it as HTTP."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...]
    cache_control: str = CACHE_CONTROL


@attrs.frozen
class _Loaded:
    body: bytes
    etag: str


@functools.cache
def _load(resource: str) -> _Loaded:
    body = resources.files(PACKAGE).joinpath(resource).read_bytes()
    return _Loaded(body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def content_security_policy(host: str | None) -> str:
    """The page's CSP; ``host`` is the request's Host header, trusted only if it looks like one."""
    connect = ["'self'"]
    if host and _HOST.fullmatch(host):
        connect += [f"ws://{host}", f"wss://{host}"]
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            f"connect-src {' '.join(connect)}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def security_headers(host: str | None) -> tuple[tuple[str, str], ...]:
    return (
        ("Content-Security-Policy", content_security_policy(host)),
        ("X-Content-Type-Options", "nosniff"),
        # The page may carry ?token= in its address: never hand that to anyone as a referrer.
        ("Referrer-Policy", "no-referrer"),
        ("Permissions-Policy", "microphone=(self)"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
    )


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison against an If-None-Match list (or ``*``)."""
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


def answer(path: str, headers: Mapping[str, str]) -> Reply | None:
    """The reply to a GET (or HEAD) of ``path``, or None when it is not a page file.

    ``headers`` are the request's, with lower-case names (``host``, ``if-none-match``).
    """
    asset = ASSETS.get(path)
    if asset is None:
        return None
    loaded = _load(asset.resource)
    extra = (("ETag", loaded.etag), *security_headers(headers.get("host")))
    if _matches(headers.get("if-none-match", ""), loaded.etag):
        return Reply(304, b"", asset.content_type, extra)
    return Reply(200, loaded.body, asset.content_type, extra)
