"""Hostile input for the live-socket tests: HTTP request heads, raw WebSocket frames and JSON
messages, generated from a seeded ``random.Random`` so every run sends the same cases.

Nothing here knows what the server should answer; the tests only ask that it survives, keeps
answering ``/health`` and keeps serving a good client as if nothing happened.
"""

from __future__ import annotations

import base64
import json
import os
import random
import struct

import trio

from .conftest import http_request

HANDSHAKE_KEY = base64.b64encode(b"0123456789abcdef").decode()

# --- HTTP request heads ------------------------------------------------------------------------

_METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"CONNECT", b"G\x00T", b"get", b""]
_TARGETS = [
    b"/",
    b"//[",
    b"/[::1",
    b"/health",
    b"/metrics?x=1",
    b"/static/app.js",
    b"/static/../static.py",
    b"/static/%2e%2e/%2e%2e/etc/passwd",
    b"/v1/realtime?intent=transcription",
    b"/v1/realtime?intent=conversation",
    b"/v1/realtime?intent=%zz&intent",
    b"/v1/audio/transcriptions",
    b"/v1/audio/translations?x=%ff",
    b"/%ff%00",
    b"*",
    b"http://example.com/",
    b"/?token=%zz&token",
    b"/\xff",
    b"/" + b"a" * 20000,
    b"",
]
_VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/9.9", b"HTTP/1.1x", b""]
_HEADER_NAMES = [
    b"Host",
    b"Upgrade",
    b"Connection",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Version",
    b"Sec-WebSocket-Protocol",
    b"Origin",
    b"Authorization",
    b"X-Forwarded-For",
    b"X-Real-IP",
    b"Content-Length",
    b"Transfer-Encoding",
    b"X\x80Y",
    b"",
]


def _junk(rng: random.Random, size: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(size))


def _header_value(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return _junk(rng, rng.randrange(1, 40))
    if kind == 1:
        return b"x\xff\xfe"  # bytes 0x80-0xFF (obs-text)
    if kind == 2:
        return b"websocket"
    if kind == 3:
        return b"Upgrade"
    if kind == 4:
        return str(rng.choice([13, 8, -1, 10**30])).encode()
    if kind == 5:
        return b"a" * rng.choice([100, 9000, 20000])
    if kind == 6:
        return b"bearer.x, \x00, ,,"
    return HANDSHAKE_KEY.encode()


def _pick(rng: random.Random, usual: bytes, odd: list[bytes], p_odd: float = 0.25) -> bytes:
    return rng.choice(odd) if rng.random() < p_odd else usual


def http_head(rng: random.Random) -> bytes:
    """A request head that is mostly right and wrong in one or two places, so that it gets past
    the first check and reaches the later ones: the upgrade, the headers, the routes."""
    if rng.random() < 0.1:
        return _junk(rng, rng.randrange(1, 3000))
    line = b" ".join(
        [
            _pick(rng, b"GET", _METHODS),
            _pick(rng, rng.choice([b"/", b"/health", b"/metrics"]), _TARGETS, 0.4),
            _pick(rng, b"HTTP/1.1", _VERSIONS, 0.15),
        ]
    )
    headers = [(b"Host", b"127.0.0.1")] if rng.random() < 0.9 else []
    if rng.random() < 0.6:
        headers += [
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", HANDSHAKE_KEY.encode()),
            (b"Sec-WebSocket-Version", b"13"),
        ]
    for _ in range(rng.randrange(0, 4)):
        headers.append(
            (_pick(rng, rng.choice(_HEADER_NAMES[:12]), _HEADER_NAMES, 0.1), _header_value(rng))
        )
    rng.shuffle(headers)
    eol = _pick(rng, b"\r\n", [b"\n", b"\r"], 0.1)
    return line + eol + b"".join(n + b": " + v + eol for n, v in headers) + eol + eol


# --- WebSocket frames --------------------------------------------------------------------------


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    claimed_length: int | None = None,
) -> bytes:
    """One frame as a client would send it, with every field under the caller's control."""
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode & 0xF
    length = len(payload) if claimed_length is None else claimed_length
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, min(length, (1 << 64) - 1))
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frames(rng: random.Random) -> bytes:
    """A burst of frames after a good handshake: every opcode, RSV bits, unmasked frames,
    fragments in every order, oversized and fragmented control frames, invalid UTF-8, lying
    lengths."""
    out = []
    for _ in range(rng.randrange(1, 8)):
        kind = rng.randrange(12)
        if kind == 0:
            out.append(frame(rng.randrange(16), _junk(rng, rng.randrange(0, 200))))
        elif kind == 1:
            out.append(frame(0x1, b'{"type":"flush"}', rsv=rng.randrange(1, 8)))
        elif kind == 2:
            out.append(frame(0x2, b"\x00\x00" * 50, masked=False))
        elif kind == 3:  # a fragmented message, then its continuations (or none)
            out.append(frame(0x1, b'{"type":', fin=False))
            for _ in range(rng.randrange(0, 3)):
                out.append(frame(0x0, b'"au', fin=False))
            if rng.random() < 0.5:
                out.append(frame(0x0, b'dio"}'))
        elif kind == 4:
            out.append(frame(0x0, b"orphan continuation"))
        elif kind == 5:
            out.append(frame(0x9, _junk(rng, rng.choice([0, 10, 125, 126, 300]))))
        elif kind == 6:
            out.append(frame(0xA, b"unsolicited pong"))
        elif kind == 7:
            out.append(frame(0x9, b"fragmented ping", fin=False))
        elif kind == 8:
            out.append(frame(0x1, b"\xff\xfe invalid \xc3\x28 utf-8"))
        elif kind == 9:  # lying length: claims far more than follows
            out.append(frame(0x2, b"\x00" * 10, claimed_length=rng.choice([200, 1 << 20, 1 << 62])))
        elif kind == 10:
            out.append(frame(0x8, _junk(rng, rng.choice([1, 2, 5, 130]))))
        else:
            out.append(frame(0x2, b"\x01" * rng.choice([1, 3, 4000, 64 * 1024 + 1])))
    return b"".join(out)


# --- JSON messages -----------------------------------------------------------------------------

_TYPES = ["audio", "config", "flush", "end", "", "AUDIO", "x" * 500, None, 7, [], {}]


def _value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(10 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 16000, 48001, 2**31, 2**63, -(2**70)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 1e-320, 16000.0])
    if kind == 4:
        return rng.choice(["", "en", "xx", "\u0000\u202e", "é" * 100, "AAAA", "!!", "a" * 10000])
    if kind == 5:
        return base64.b64encode(_junk(rng, rng.randrange(0, 64))).decode()
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {str(rng.randrange(5)): _value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def json_message(rng: random.Random) -> str:
    """A text frame: every type in every field, huge numbers, deep nesting, invalid literals."""
    kind = rng.randrange(9)
    if kind == 8:  # escapes that a backtracking tokenizer would rescan from every quote
        return '{"type":"config","language":"' + '\\"' * rng.choice([20000, 60000])
    if kind == 0:  # a number of thousands of digits, in the field that wants an int
        digits = "9" * rng.choice([20, 400, 4301, 20000])
        return f'{{"type":"{rng.choice(["config", "audio"])}","sample_rate":{digits}}}'
    if kind == 1:
        depth = rng.choice([17, 100, 2000, 100000])
        return '{"type":"config","language":' + "[" * depth + "]" * depth + "}"
    if kind == 2:
        return (
            '{"type":"config","sample_rate":' + rng.choice(["NaN", "Infinity", "-Infinity"]) + "}"
        )
    if kind == 3:
        return '{"type":"config","sample_rate":1e999}'
    if kind == 4:
        return json.dumps({"type": "audio", "data": _value(rng), "sample_rate": _value(rng)})
    if kind == 5:
        return json.dumps({"type": rng.choice(_TYPES), "language": _value(rng)})
    if kind == 6:
        return json.dumps({"k" * rng.choice([10, 100, 5000]): 1, "type": "flush"})
    return json.dumps({"type": rng.choice(_TYPES), **{str(i): _value(rng) for i in range(3)}})


_REALTIME_TYPES = [
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "response.create",
    "",
    None,
    7,
]


def realtime_event(rng: random.Random) -> str:
    """A text frame for ``/v1/realtime``: OpenAI's event shapes with junk in every field."""
    kind = rng.randrange(5)
    if kind == 0:
        audio = {"format": _value(rng), "transcription": {"language": _value(rng)}}
        audio["turn_detection"] = rng.choice(
            [
                None,
                _value(rng),
                {
                    "type": "server_vad",
                    "threshold": _value(rng),
                    "silence_duration_ms": _value(rng),
                    "prefix_padding_ms": _value(rng),
                },
            ]
        )
        session = {"type": rng.choice(["transcription", "realtime", _value(rng)])}
        session["audio"] = {"input": audio} if rng.random() < 0.8 else _value(rng)
        return json.dumps({"type": "session.update", "event_id": _value(rng), "session": session})
    if kind == 1:
        fields = {k: _value(rng) for k in ("input_audio_format", "turn_detection")}
        fields["input_audio_transcription"] = {"prompt": _value(rng), "model": _value(rng)}
        return json.dumps({"type": "transcription_session.update", "session": fields})
    if kind == 2:
        data = rng.choice(
            [base64.b64encode(_junk(rng, rng.randrange(0, 999))).decode(), _value(rng), "!!!"]
        )
        return json.dumps({"type": "input_audio_buffer.append", "audio": data})
    if kind == 3:
        return json.dumps({"type": rng.choice(_REALTIME_TYPES), "event_id": _value(rng)})
    return json_message(rng)


def native_config(rng: random.Random) -> str:
    """A native ``config`` with junk in the language, task, prompt and hotwords fields."""
    fields = ("language", "task", "prompt", "hotwords", "sample_rate")
    return json.dumps({"type": "config", **{k: _value(rng) for k in fields if rng.random() < 0.6}})


def file_request(rng: random.Random) -> bytes:
    """A POST to the file API: multipart bodies broken in one place or another, lying lengths,
    chunked framing, a WAV header in front of junk."""
    boundary = rng.choice([b"b0undary", b"", b"x" * 200, b"\xff"])
    wav = b"RIFF\xff\xff\x00\x00WAVEfmt " + _junk(rng, rng.randrange(0, 200))
    payload = rng.choice([wav, _junk(rng, rng.randrange(0, 3000)), b""])
    body = (
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="'
        + rng.choice([b"file", b"model", b"response_format", b"\x00", b""])
        + b'"; filename="'
        + rng.choice([b"a.wav", b"../../x", b"\xff"])
        + b'"\r\n\r\n'
        + payload
        + b"\r\n--"
        + boundary
        + rng.choice([b"--\r\n", b"", b"\r\n"])
    )
    if rng.random() < 0.2:
        body = _junk(rng, rng.randrange(0, 2000))
    route = rng.choice([b"/v1/audio/transcriptions", b"/v1/audio/translations"])
    head = b"POST " + route + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += (
        b"Content-Type: "
        + rng.choice(
            [b"multipart/form-data; boundary=" + boundary, b"multipart/form-data", b"text/plain"]
        )
        + b"\r\n"
    )
    if rng.random() < 0.3:
        chunk = rng.choice([b"%x" % len(body), b"zz", b"1" * 30])
        return (
            head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"\r\n" + body + b"\r\n0\r\n\r\n"
        )
    length = rng.choice([len(body), len(body) + rng.randrange(1, 100), 0, 1 << 40])
    return head + b"Content-Length: %d\r\n\r\n" % length + body


# --- talking to the server ---------------------------------------------------------------------


def upgrade_request(path: str = "/") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {HANDSHAKE_KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def exchange(port: int, data: bytes, *, linger: float = 0.3) -> bytes:
    """Send ``data`` on a fresh connection, read what comes back for up to ``linger`` seconds
    after the server stops talking, then hang up; returns what was read."""
    received = bytearray()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        try:
            await stream.send_all(data)
            while True:
                with trio.move_on_after(linger):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    received += chunk
                    continue
                break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    return bytes(received)


async def health_status(port: int) -> int:
    """The status code of ``GET /health``."""
    status, _, _ = await http_request(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return status
