"""The browser page's files over HTTP: the allow-list, content types, cache policy, the CSP,
path traversal (sans-IO and through the real socket), package data, and the nginx recipe for
serving the files statically in front of the servers."""

from __future__ import annotations

import functools
import json
import re
import shutil
import tomllib
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import attrs
import pytest
import trio
from trio_websocket import open_websocket_url

from stt_server import static
from stt_server.http import RequestHead, Response, Routes, parse_request_head, respond

from .conftest import http_request

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 30

#: What each kind of file must be served as (module scripts and worklets need a JS type).
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: Requests that must not reach a file: traversal in every spelling, names outside the
#: allow-list (the package's Python files among them), near misses of real names.
NOT_SERVED = [
    "/index.html",
    "/static/",
    "/static",
    "/static/index.html",
    "/static/__init__.py",
    "/static/../__init__.py",
    "/static/../static.py",
    "/static/%2e%2e/__init__.py",
    "/static/%2E%2E%2F__init__.py",
    "/static/..%2f..%2fserver.py",
    "/static/..%5c__init__.py",
    "/static/..\\__init__.py",
    "/static//app.js",
    "/static/./app.js",
    "/static/app.js/",
    "/static/app.js.",
    "/static/APP.JS",
    "/static/app.js%00",
    "/static/app%2ejs",
    "/static%2fapp.js",
    "/../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/web/app.js",
    "/stt_server/web/app.js",
]

ROUTES = Routes(
    health=lambda: (True, {"status": "ok"}),
    metrics=lambda: (b"# metrics\n", "text/plain; version=0.0.4"),
)


def get(path: str, **headers: str) -> RequestHead:
    lines = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    return parse_request_head(
        f"GET {path} HTTP/1.1\r\nHost: stt.example:8012\r\n{lines}\r\n".encode()
    )


def header(response: Response, name: str) -> str | None:
    return dict(response.headers).get(name)


def file_bytes(name: str) -> bytes:
    return resources.files(static.PACKAGE).joinpath(name).read_bytes()


# --- sans-IO ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(static.ASSETS))
def test_every_page_file_is_served_with_its_type_and_policy(path: str) -> None:
    asset = static.ASSETS[path]
    response = respond(get(path), ROUTES)
    assert response.status == 200
    assert response.body == file_bytes(asset.resource) and response.body
    assert response.content_type == TYPES[Path(asset.resource).suffix]
    assert response.cache_control == "no-cache"
    assert re.fullmatch(r'"[0-9a-f]{32}"', header(response, "ETag"))
    assert header(response, "X-Content-Type-Options") == "nosniff"
    assert header(response, "Referrer-Policy") == "no-referrer"
    encoded = response.encode().decode("utf-8", "replace")
    assert "Cache-Control: no-cache\r\n" in encoded and "no-store" not in encoded


def test_the_page_is_slash() -> None:
    assert static.ASSETS["/"].resource == "index.html"
    response = respond(get("/?autostart=1&token=abc"), ROUTES)  # the query changes nothing
    assert response.status == 200 and response.body == file_bytes("index.html")


def test_a_matching_etag_gets_a_bodyless_304() -> None:
    etag = header(respond(get("/static/app.js"), ROUTES), "ETag")
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = respond(get("/static/app.js", If_None_Match=value), ROUTES)
        assert response.status == 304, value
        assert header(response, "ETag") == etag and response.cache_control == "no-cache"
        wire = response.encode()
        assert wire.startswith(b"HTTP/1.1 304 Not Modified\r\n") and wire.endswith(b"\r\n\r\n")
        assert b"\r\nContent-Length:" not in wire and b"\r\nContent-Type:" not in wire
    assert respond(get("/static/app.js", If_None_Match='"other"'), ROUTES).status == 200
    # Each file has its own tag: one file's tag does not validate another.
    assert respond(get("/static/audio.js", If_None_Match=etag), ROUTES).status == 200


def csp_directives(policy: str) -> dict[str, list[str]]:
    out = {}
    for directive in policy.split(";"):
        name, *values = directive.split()
        out[name] = values
    return out


def test_the_csp_allows_only_the_page_itself_and_its_websocket() -> None:
    policy = header(respond(get("/"), ROUTES), "Content-Security-Policy")
    directives = csp_directives(policy)
    assert directives == {
        "default-src": ["'none'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'"],
        "connect-src": ["'self'", "ws://stt.example:8012", "wss://stt.example:8012"],
        "base-uri": ["'none'"],
        "form-action": ["'none'"],
        "frame-ancestors": ["'none'"],
    }
    assert "unsafe" not in policy and "*" not in policy and "data:" not in policy


@pytest.mark.parametrize(
    ("host", "connect"),
    [
        ("[::1]:8012", ["'self'", "ws://[::1]:8012", "wss://[::1]:8012"]),
        ("stt.example.com", ["'self'", "ws://stt.example.com", "wss://stt.example.com"]),
        ("evil.example; script-src *", ["'self'"]),
        ("a b", ["'self'"]),
        ("'unsafe-inline'", ["'self'"]),
        ("", ["'self'"]),
        (None, ["'self'"]),
    ],
)
def test_only_a_well_formed_host_goes_into_the_csp(host: str | None, connect: list[str]) -> None:
    directives = csp_directives(static.content_security_policy(host))
    assert directives["connect-src"] == connect
    assert directives["script-src"] == ["'self'"]


@pytest.mark.parametrize("path", NOT_SERVED)
def test_nothing_outside_the_allow_list_is_served(path: str) -> None:
    try:
        head = get(path)
    except Exception:  # refused at the door (400) is fine too
        return
    response = respond(head, ROUTES)
    assert response.status == 404, path
    assert response.cache_control == "no-store"
    for name in ("__init__.py", "index.html", "app.js"):
        assert file_bytes(name)[:40] not in response.body


def test_health_metrics_and_errors_are_still_never_cached() -> None:
    for path in ("/health", "/metrics", "/nope"):
        response = respond(get(path), ROUTES)
        assert response.cache_control == "no-store"
        assert b"Cache-Control: no-store\r\n" in response.encode()
    assert respond(attrs.evolve(get("/"), method="POST"), ROUTES).status == 405


# --- the files themselves -------------------------------------------------------------------


def test_every_file_the_page_loads_is_in_the_allow_list_and_every_entry_is_used() -> None:
    """Follows the page as a browser would: index.html's src/href, the modules' imports and the
    worklet URL. A new file that is not allow-listed, or a dead entry, fails here."""
    referenced = {"/"}
    html = file_bytes("index.html").decode()
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith("static/"), f"index.html refers to {url} (relative, no host)"
        referenced.add("/" + url)
    for name in [a.resource for a in static.ASSETS.values() if a.resource.endswith(".js")]:
        source = file_bytes(name).decode()
        imports = re.findall(r'from\s+"\./([^"]+)"', source)
        imports += re.findall(r'new URL\("([^"]+)", import\.meta\.url\)', source)
        assert "innerHTML" not in source and "eval(" not in source, name
        referenced.update(f"/static/{target}" for target in imports)
    assert referenced == set(static.ASSETS)


def test_the_package_ships_exactly_the_allow_listed_files() -> None:
    """What an installed server can serve: every page file is declared package data."""
    web = resources.files(static.PACKAGE)
    files = {
        entry.name
        for entry in web.iterdir()
        if entry.is_file() and not entry.name.endswith((".py", ".pyc"))
    }
    assert files == {asset.resource for asset in static.ASSETS.values()}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"][static.PACKAGE]
    for name in files:
        assert any(fnmatch(name, pattern) for pattern in patterns), f"{name} is not package data"


# --- through the real socket ----------------------------------------------------------------


async def http(port: int, request: str) -> tuple[int, dict[str, str], bytes]:
    return await http_request(port, request.encode())


async def test_the_server_serves_the_page_and_refuses_traversal(running_server) -> None:
    port = running_server.server.port
    host = f"127.0.0.1:{port}"
    with trio.fail_after(DEADLINE):
        status, headers, body = await http(port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")
        assert status == 200 and body == file_bytes("index.html")
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["Cache-Control"] == "no-cache"
        assert f"connect-src 'self' ws://{host} wss://{host};" in headers["Content-Security-Policy"]
        etag = headers["ETag"]

        request = f"GET / HTTP/1.1\r\nHost: {host}\r\nIf-None-Match: {etag}\r\n\r\n"
        status, headers, body = await http(port, request)
        assert status == 304 and body == b"" and headers["ETag"] == etag

        status, headers, body = await http(
            port, f"HEAD /static/app.js HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )
        assert status == 200 and body == b""
        assert int(headers["Content-Length"]) == len(file_bytes("app.js"))
        assert headers["Content-Type"] == "text/javascript; charset=utf-8"

        for path in NOT_SERVED:
            status, _, body = await http(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
            assert status in (400, 404), path
            assert b"import" not in body and b"<html" not in body, path
        status, headers, _ = await http(port, f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n")
        assert status == 200 and headers["Cache-Control"] == "no-store"


# --- behind nginx, as static files ----------------------------------------------------------

#: The README's recipe ("The browser page"), with this test's paths and ports filled in.
NGINX_SITE = """
upstream stt_backends {{ server 127.0.0.1:{backend}; }}

server {{
    listen 127.0.0.1:{port};
    root {web};                      # a copy of the page's files

    location = / {{
        # A WebSocket upgrade of / goes to the servers; a plain GET gets the page.
        error_page 418 = @stt;
        if ($http_upgrade) {{ return 418; }}
        try_files /index.html =404;
        add_header Content-Security-Policy "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self' ws://$http_host wss://$http_host; base-uri 'none'; form-action 'none'; frame-ancestors 'none'" always;
        add_header X-Content-Type-Options nosniff always;
        add_header Referrer-Policy no-referrer always;
        add_header Permissions-Policy "microphone=(self)" always;
        add_header Cache-Control no-cache always;
    }}
    location /static/ {{
        alias {web}/;
        charset utf-8;
        charset_types text/css application/javascript image/svg+xml;
        add_header X-Content-Type-Options nosniff always;
        add_header Cache-Control no-cache always;
    }}
    location @stt {{
        proxy_pass http://stt_backends;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_read_timeout 3600s;
    }}
}}
"""  # noqa: E501

#: nginx's own names (/etc/nginx/mime.types); browsers accept either JavaScript type.
NGINX_TYPES = {
    ".html": "text/html",
    ".css": "text/css; charset=utf-8",
    ".js": "application/javascript; charset=utf-8",
    ".svg": "image/svg+xml; charset=utf-8",
}

NGINX_MAIN = """
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 64; }}
http {{
    include /etc/nginx/mime.types;
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {site}
}}
"""


def find_nginx() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("nginx is required (Debian package); scripts/test.sh installs it")


async def test_the_files_work_as_static_files_behind_nginx(
    running_server, nursery, tmp_path, free_port
) -> None:
    nginx = find_nginx()
    web = tmp_path / "web"
    web.mkdir()
    for asset in static.ASSETS.values():
        (web / asset.resource).write_bytes(file_bytes(asset.resource))
    site = NGINX_SITE.format(backend=running_server.server.port, port=free_port, web=web)
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(tmp=tmp_path, site=site))
    await trio.run_process([nginx, "-t", "-q", "-c", str(conf)])
    process = await nursery.start(
        functools.partial(trio.run_process, [nginx, "-c", str(conf)], check=False)
    )
    host = f"127.0.0.1:{free_port}"
    try:
        with trio.fail_after(DEADLINE):
            while True:  # nginx is up once it accepts
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", free_port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
            status, headers, body = await http(
                free_port, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            assert status == 200 and body == file_bytes("index.html")
            assert headers["Content-Security-Policy"] == static.content_security_policy(host)
            assert headers["Cache-Control"] == "no-cache"
            for path, asset in static.ASSETS.items():
                status, headers, body = await http(
                    free_port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                )
                assert status == 200 and body == file_bytes(asset.resource), path
                assert headers["Content-Type"] == NGINX_TYPES[Path(asset.resource).suffix]
            async with open_websocket_url(f"ws://{host}/") as ws:  # the same address, upgraded
                assert json.loads(await ws.get_message())["type"] == "session"
    finally:
        process.terminate()
