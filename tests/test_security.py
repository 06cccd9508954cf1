"""Authentication, origins, proxies, rate limits, resource limits and TLS, over real sockets."""

from __future__ import annotations

import functools
import json
import ssl
import subprocess
import sys

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from stt_server.auth import (
    TokensFileError,
    TokenStore,
    address_key,
    client_ip,
    credentials,
    parse_networks,
)
from stt_server.config import Config
from stt_server.http import parse_request_head
from stt_server.ratelimit import KeyedLimiter, TokenBucket
from stt_server.server import serve

from .conftest import receive_until_closed, wait_until

DEADLINE = 60


def make_token(tmp_path, label: str = "team-web") -> tuple[str, str]:
    """Through the real CLI: line 1 is the token, line 2 goes into the tokens file."""
    out = subprocess.run(
        [sys.executable, "-m", "stt_server", "token", "new", label],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    token, line = out
    path = tmp_path / "tokens"
    path.write_text(f"# issued for tests\n{line}\n")
    assert token not in path.read_text()  # only the hash is stored
    return token, str(path)


async def start(nursery, speech_model, **settings):
    config = Config(**{"host": "127.0.0.1", "port": 0, "control_socket": "", **settings})
    server = await nursery.start(functools.partial(serve, config, model=speech_model))
    return server, f"ws://127.0.0.1:{server.port}/"


# --- tokens -------------------------------------------------------------------------------------


async def test_a_good_token_works_from_each_of_the_three_places(
    nursery, speech_model, tmp_path, caplog
) -> None:
    caplog.set_level("INFO")
    token, tokens_file = make_token(tmp_path)
    server, url = await start(nursery, speech_model, tokens_file=tokens_file)
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(
            url, extra_headers=[(b"authorization", f"Bearer {token}".encode())]
        ) as ws:
            assert json.loads(await ws.get_message())["type"] == "session"
            assert server.statistics().sessions[0].token_label == "team-web"
        async with open_websocket_url(f"{url}?token={token}") as ws:
            assert json.loads(await ws.get_message())["type"] == "session"
        async with open_websocket_url(url, subprotocols=[f"bearer.{token}"]) as ws:
            assert ws.subprotocol == f"bearer.{token}"  # echoed, as browsers require
            assert json.loads(await ws.get_message())["type"] == "session"
    assert "(team-web)" in caplog.text  # the label, never the token, in the logs
    assert token not in caplog.text


async def test_missing_or_wrong_tokens_are_refused_the_right_way(
    nursery, speech_model, tmp_path
) -> None:
    _, tokens_file = make_token(tmp_path)
    server, url = await start(nursery, speech_model, tokens_file=tokens_file)
    with trio.fail_after(DEADLINE):
        # A program (no Origin): plain HTTP 401 before any upgrade.
        for headers in ([], [(b"authorization", b"Bearer wrong")]):
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(url, extra_headers=headers):
                    pass
            assert rejected.value.status_code == 401
            assert b"unauthorized" in rejected.value.body
        # A browser (Origin set) cannot read a 401: it gets the error over the socket and 4401.
        async with open_websocket_url(
            f"{url}?token=nope", extra_headers=[(b"origin", b"https://app.example")]
        ) as ws:
            messages, code = await receive_until_closed(ws)
        assert messages == [
            {"type": "error", "code": "unauthorized", "message": "a valid token is required"}
        ]
        assert code == 4401
    assert server.statistics().refused == {"unauthorized": 3}
    assert not server.sessions


def test_tokens_file_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text("sha256:abc team\n")
    with pytest.raises(TokensFileError, match=r"tokens:1: expected"):
        TokenStore.load(path)
    with pytest.raises(TokensFileError, match="cannot read"):
        TokenStore.load(tmp_path / "missing")


# --- origins and proxies ----------------------------------------------------------------------


async def test_allowed_origins(nursery, speech_model) -> None:
    server, url = await start(nursery, speech_model, allowed_origins="https://app.example")
    with trio.fail_after(DEADLINE):
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(
                url, extra_headers=[(b"origin", b"https://evil.example")]
            ):
                pass
        assert rejected.value.status_code == 403
        async with open_websocket_url(
            url, extra_headers=[(b"origin", b"https://app.example")]
        ) as ws:
            assert json.loads(await ws.get_message())["type"] == "session"
        async with open_websocket_url(url) as ws:  # no Origin: not a browser, not affected
            assert json.loads(await ws.get_message())["type"] == "session"
    assert server.statistics().refused == {"origin_not_allowed": 1}


def head(headers: dict[str, str]):
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return parse_request_head(f"GET / HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())


def test_ipv6_clients_count_per_64_and_mapped_ipv4_as_ipv4() -> None:
    one = address_key("2001:db8:1:2:aaaa::1")
    assert one == address_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert one != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:198.51.100.7") == address_key("198.51.100.7") == "198.51.100.7"


def test_client_ip_believes_forwarding_headers_only_from_trusted_proxies() -> None:
    proxies = parse_networks("127.0.0.1, 10.0.0.0/8")
    forged = head({"X-Forwarded-For": "198.51.100.7"})
    assert client_ip("203.0.113.9", forged, proxies) == "203.0.113.9"  # untrusted peer
    assert client_ip("127.0.0.1", forged, proxies) == "198.51.100.7"
    # X-Real-IP only when configured: a proxy that does not set it lets the client set it.
    real = head({"X-Real-IP": "198.51.100.8", "X-Forwarded-For": "198.51.100.7"})
    assert client_ip("127.0.0.1", real, proxies) == "198.51.100.7"
    assert client_ip("127.0.0.1", real, proxies, "X-Real-IP") == "198.51.100.8"
    assert client_ip("203.0.113.9", real, proxies, "X-Real-IP") == "203.0.113.9"
    # A client can prepend anything; the nearest untrusted hop (appended by our proxies) counts.
    chain = head({"X-Forwarded-For": "1.2.3.4, 198.51.100.7, 10.0.0.5"})
    assert client_ip("10.1.1.1", chain, proxies) == "198.51.100.7"
    assert client_ip("127.0.0.1", head({"X-Forwarded-For": "garbage"}), proxies) == "127.0.0.1"


async def test_forged_x_forwarded_for_is_ignored_and_a_trusted_proxy_is_honoured(
    nursery, speech_model
) -> None:
    def forwarded(ip: str) -> list[tuple[bytes, bytes]]:
        return [(b"x-forwarded-for", ip.encode())]

    with trio.fail_after(DEADLINE):
        _, url = await start(nursery, speech_model, max_sessions_per_ip=1)
        async with open_websocket_url(url, extra_headers=forwarded("198.51.100.1")) as one:
            await one.get_message()
            async with open_websocket_url(url, extra_headers=forwarded("198.51.100.2")) as two:
                messages, code = await receive_until_closed(two)
        assert code == 1008 and messages[0]["code"] == "rate_limited"  # both are 127.0.0.1

        server, url = await start(
            nursery, speech_model, max_sessions_per_ip=1, trusted_proxies="127.0.0.1"
        )
        async with open_websocket_url(url, extra_headers=forwarded("198.51.100.1")) as one:
            await one.get_message()
            async with open_websocket_url(url, extra_headers=forwarded("198.51.100.2")) as two:
                assert json.loads(await two.get_message())["type"] == "session"
                peers = sorted(s.peer for s in server.statistics().sessions)
                assert peers[0].startswith("198.51.100.1 via 127.0.0.1:")
                async with open_websocket_url(
                    url, extra_headers=forwarded("198.51.100.1")
                ) as three:
                    messages, code = await receive_until_closed(three)
        assert code == 1008 and "already has 1 sessions" in messages[0]["message"]


# --- rate limits --------------------------------------------------------------------------------


def test_token_bucket_refuses_then_recovers() -> None:
    bucket = TokenBucket.full(rate=2.0, capacity=3.0, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(1, 0.0) == pytest.approx(0.5)
    assert bucket.take(1, 0.5) == 0.0
    limiter = KeyedLimiter(rate=1.0, capacity=1.0, clock=lambda: 0.0, max_keys=3)
    for ip in ("a", "b", "c", "d"):
        limiter.take(ip)
    assert len(limiter) == 3  # bounded however many addresses appear


async def test_new_connections_per_ip_are_limited_and_recover(nursery, speech_model) -> None:
    server, url = await start(nursery, speech_model, connections_per_minute=30)
    with trio.fail_after(DEADLINE):
        started = trio.current_time()
        accepted = 0
        while True:  # the bucket holds 30 and refills 0.5 per second
            async with open_websocket_url(url) as ws:
                first = json.loads(await ws.get_message())
                if first["type"] == "error":
                    rest, code = await receive_until_closed(ws)
                    messages = [first, *rest]
                    break
            accepted += 1
        elapsed = trio.current_time() - started
        assert 30 <= accepted <= 30 + elapsed * 0.5 + 1
        assert code == 1008 and messages[0]["code"] == "rate_limited"
        assert 0 < messages[0]["retry_after"] <= 2.5
        await trio.sleep(messages[0]["retry_after"] + 0.1)
        async with open_websocket_url(url) as ws:
            assert json.loads(await ws.get_message())["type"] == "session"
    assert server.statistics().refused == {"rate_limited": 1}


async def test_concurrent_sessions_per_token_are_limited(nursery, speech_model, tmp_path) -> None:
    token, tokens_file = make_token(tmp_path)
    _, url = await start(nursery, speech_model, tokens_file=tokens_file, max_sessions_per_token=1)
    url = f"{url}?token={token}"
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(url) as one:
            await one.get_message()
            async with open_websocket_url(url) as two:
                messages, code = await receive_until_closed(two)
            assert code == 1008 and "this token already has 1" in messages[0]["message"]
        await trio.sleep(0.2)
        async with open_websocket_url(url) as again:
            assert json.loads(await again.get_message())["type"] == "session"


async def test_audio_faster_than_real_time_is_allowed_a_burst_then_closed(
    nursery, speech_model, clip
) -> None:
    _, url = await start(nursery, speech_model, max_realtime_factor=2.0, audio_burst=3.0)
    speech = clip("jfk.wav")
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            await ws.send_message(speech[: 16000 * 3].tobytes())  # the burst: fine
            await trio.sleep(1.0)  # refills 2 s of audio
            await ws.send_message(speech[16000 * 3 : 16000 * 5].tobytes())  # fine again
            await ws.send_message(speech[16000 * 5 :].tobytes())  # 6 s at once: too fast
            messages, code = await receive_until_closed(ws)
    assert code == 1008
    assert messages[-1]["code"] == "rate_limited" and "2x real time" in messages[-1]["message"]
    # The speech that was accepted still gets its finals.
    assert "fellow" in " ".join(m["text"] for m in messages if m["type"] == "completed").lower()


async def test_too_many_messages_per_second(nursery, speech_model) -> None:
    _, url = await start(nursery, speech_model, max_messages_per_second=10.0)
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            for _ in range(15):  # within the burst of 20
                await ws.send_message(b"\x00\x00")
            await trio.sleep(1.0)
            for _ in range(15):  # refilled: fine
                await ws.send_message(b"\x00\x00")
            assert not ws.closed
            for _ in range(30):
                try:
                    await ws.send_message(b"\x00\x00")
                except ConnectionClosed:
                    break
            messages, code = await receive_until_closed(ws)
    assert code == 1008 and messages[-1]["code"] == "rate_limited"


# --- resource limits ----------------------------------------------------------------------------


async def test_slowloris_handshake_is_dropped(nursery, speech_model) -> None:
    server, _ = await start(nursery, speech_model, handshake_timeout=0.5)
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            start_time = trio.current_time()
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            try:
                while True:  # one header byte at a time, never finishing
                    await stream.send_all(b"X")
                    await trio.sleep(0.1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            assert await stream.receive_some(1024) == b""
            assert trio.current_time() - start_time < 3


async def test_max_session_length_finalizes_and_closes(nursery, speech_model, clip) -> None:
    _, url = await start(nursery, speech_model, max_session_length=1.5)
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            await ws.send_message(clip("jfk.wav")[: 16000 * 2].tobytes())
            messages, code = await receive_until_closed(ws)
    assert code == 1008
    assert messages[-1]["code"] == "session_too_long"
    assert any(m["type"] == "completed" for m in messages)


# --- TLS ----------------------------------------------------------------------------------------


async def test_transcription_over_wss_with_a_test_certificate(
    nursery, speech_model, clip, tmp_path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(keyfile))
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for blob in cert.cert_chain_pems[1:]:
        with certfile.open("ab") as fh:
            fh.write(blob.bytes())
    server, _ = await start(nursery, speech_model, certfile=str(certfile), keyfile=str(keyfile))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(f"wss://127.0.0.1:{server.port}/", context) as ws:
            await ws.get_message()
            await ws.send_message(clip("ldc93s1.wav").tobytes())
            await ws.send_message('{"type":"end"}')
            messages, code = await receive_until_closed(ws)
        # Plain text to the TLS port: the server hangs up at once and carries on.
        plain = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with plain:
            await plain.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
            assert await plain.receive_some(1024) == b""
        await wait_until(lambda: not server.sessions)
    assert code == 1000
    assert "suit" in " ".join(m["text"] for m in messages if m["type"] == "completed").lower()


def test_credentials_parsing_prefers_header_then_query_then_subprotocol() -> None:
    both = head({"Authorization": "Bearer aaa", "Sec-WebSocket-Protocol": "bearer.bbb"})
    assert credentials(both).token == "aaa"
    sub = head({"Sec-WebSocket-Protocol": "chat, bearer.bbb"})
    assert (credentials(sub).token, credentials(sub).subprotocol) == ("bbb", "bearer.bbb")
    assert credentials(head({})).token is None
    assert credentials(head({"Authorization": "Basic xyz"})).token is None
