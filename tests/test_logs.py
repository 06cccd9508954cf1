"""JSON logs carry their facts as keys: one line per session start and end and per error."""

from __future__ import annotations

import json
import logging

import trio
from trio_websocket import open_websocket_url

from stt_server.logs import JsonFormatter

from .conftest import receive_until_closed, wait_until


async def test_json_log_lines_carry_session_fields_as_keys(running_server, clip, caplog) -> None:
    caplog.set_level(logging.INFO, logger="stt_server")
    async with open_websocket_url(running_server.url) as ws:
        session_id = json.loads(await ws.get_message())["session_id"]
        await ws.send_message('{"type":"nonsense"}')
        await ws.send_message(clip("ldc93s1.wav").tobytes())
        await ws.send_message('{"type":"end"}')
        await receive_until_closed(ws)
    with trio.fail_after(10):
        await wait_until(lambda: not running_server.server.sessions)  # its end is logged
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name.startswith("stt")]
    mine = [line for line in lines if line.get("session_id") == session_id]
    events = [line["event"] for line in mine]
    assert events == ["session_start", "session_error", "session_end"], events
    start, error, end = mine
    assert start["peer"].startswith("127.0.0.1:") and start["device"] == "cpu"
    assert "token_label" in start
    assert error["error_code"] == "invalid_message" and error["level"] == "info"
    assert end["reason"] == "end" and end["utterances"] == 1 and end["errors"] == 1
    assert 2.5 < end["audio_s"] < 3.5 and end["duration_s"] > 0
    assert all(isinstance(line["message"], str) and line["time"].endswith("Z") for line in mine)


def test_a_refusal_and_an_internal_error_are_fields_too() -> None:
    record = logging.LogRecord("stt_server.server", logging.ERROR, "x", 1, "boom %s", ("a",), None)
    record.event, record.error_code, record.session_id = "internal_error", "internal_error", None
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "boom a"
    assert line["event"] == "internal_error" and line["session_id"] is None
    assert "args" not in line and "msg" not in line  # LogRecord's own attributes stay out
