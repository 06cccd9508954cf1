"""The operator surface over real sockets: HTTP on the WebSocket port, the control socket,
draining, systemd notifications, logging, and the deploy kit checked against live metrics."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, open_websocket_url

from stt_server.breaker import BreakerState
from stt_server.config import Config
from stt_server.control import ControlError, parse_request, peer_allowed
from stt_server.logs import setup_logging
from stt_server.server import serve
from stt_server.systemd import Notifier

from .conftest import http_request, receive_until_closed, wait_until

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 60


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    return await http_request(port, f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())


def metric_values(text: str) -> dict[str, float]:
    """Every sample as 'name{label=value,...}' -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


class Control:
    """A minimal control-socket client: one request line, one reply line."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            assert chunk, "control socket closed"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    async def ask(self, **request) -> dict:
        await self.stream.send_all(json.dumps(request).encode() + b"\n")
        return await self.line()


@pytest.fixture
def control_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "control.sock"


async def connect_control(path: Path) -> Control:
    return Control(await trio.open_unix_socket(str(path)))


# --- HTTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("server_config", [{"max_connections": 1}], indirect=True)
async def test_health_is_200_when_accepting_and_503_at_capacity_and_draining(
    running_server,
) -> None:
    server = running_server.server
    with trio.fail_after(DEADLINE):
        status, headers, body = await http_get(server.port, "/health")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {
            "status": "ok",
            "sessions": 0,
            "max_connections": 1,
            "devices": {"cpu": "closed"},
        }
        async with open_websocket_url(running_server.url) as ws:  # same port, WebSocket
            await ws.get_message()
            status, _, body = await http_get(server.port, "/health")
            assert status == 503 and json.loads(body)["status"] == "at_capacity"
        await wait_until(lambda: not server.sessions)
        server.start_draining()
        status, _, body = await http_get(server.port, "/health")
        assert status == 503 and json.loads(body)["status"] == "draining"
        server.stop_draining()
        assert (await http_get(server.port, "/health"))[0] == 200


async def test_unknown_paths_methods_and_head_requests(running_server) -> None:
    port = running_server.server.port
    with trio.fail_after(DEADLINE):
        status, headers, _ = await http_get(port, "/")  # the browser page
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        status, _, body = await http_get(port, "/nope")
        assert status == 404 and b"/nope" in body
        assert (await http_get(port, "/health", "POST"))[0] == 405
        status, headers, body = await http_get(port, "/health", "HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        # Garbage instead of HTTP gets a 400, and the server carries on.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
            assert (await stream.receive_some(1024)).startswith(b"HTTP/1.1 400")
        assert (await http_get(port, "/health"))[0] == 200


@pytest.mark.parametrize("server_config", [{"simulate_gpus": "8000:0"}], indirect=True)
async def test_health_is_503_when_every_gpu_breaker_is_open(running_server) -> None:
    server = running_server.server
    server.pool.devices[0].breaker.trip("test")
    with trio.fail_after(DEADLINE):
        status, _, body = await http_get(server.port, "/health")
    assert status == 503
    assert json.loads(body)["status"] == "no_device_available"
    assert json.loads(body)["devices"] == {"sim:0": "open"}


@pytest.mark.parametrize("server_config", [{"simulate_gpus": "24576:4096"}], indirect=True)
async def test_metrics_parse_and_move_when_real_audio_streams(running_server, clip) -> None:
    server = running_server.server
    with trio.fail_after(DEADLINE):
        _, headers, before = await http_get(server.port, "/metrics")
        assert headers["Content-Type"].startswith("text/plain")
        before = metric_values(before.decode())
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            mid = metric_values((await http_get(server.port, "/metrics"))[2].decode())
            assert mid["stt_sessions_active{}"] == 1
            assert mid["stt_device_sessions{device=sim:0}"] == 1
            await ws.send_message(clip("jfk.wav").tobytes())
            await ws.send_message("not json")
            await ws.send_message('{"type":"end"}')
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()
        server.start_draining()
        async with open_websocket_url(running_server.url) as ws:  # a refusal, counted
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()
        after = metric_values((await http_get(server.port, "/metrics"))[2].decode())
    assert before["stt_audio_received_seconds_total{}"] == 0
    assert after["stt_audio_received_seconds_total{}"] == pytest.approx(11.0, abs=0.01)
    assert after["stt_utterances_finalized_total{}"] >= 3
    assert after["stt_final_latency_seconds_count{}"] == after["stt_utterances_finalized_total{}"]
    assert after["stt_inference_seconds_count{kind=final}"] >= 3
    assert after["stt_errors_total{code=invalid_message}"] == 1
    assert after["stt_errors_total{code=server_busy}"] == 1
    assert after["stt_sessions_accepted_total{}"] == 1
    assert after["stt_sessions_refused_total{reason=draining}"] == 1
    assert after["stt_sessions_active{}"] == 0
    assert after["stt_gpu_memory_total_bytes{device=sim:0}"] == 24576 * 1024 * 1024
    assert after["stt_gpu_memory_used_bytes{device=sim:0}"] == 4096 * 1024 * 1024
    assert after["stt_breaker_state{device=sim:0}"] == 0
    assert after["stt_draining{}"] == 1
    assert "stt_engine_queue_depth{device=sim:0,kind=final}" in after
    # Every model call is counted, and carries at least one request.
    calls = after["stt_engine_batches_total{device=sim:0}"]
    requests = after["stt_engine_batched_requests_total{device=sim:0}"]
    assert 3 <= calls <= requests
    # Where the workers' time went, by kind: the finals took some, no file was uploaded.
    assert after["stt_engine_busy_seconds_total{device=sim:0,kind=final}"] > 0
    assert after["stt_engine_busy_seconds_total{device=sim:0,kind=upload}"] == 0
    assert "stt_engine_unused_seconds_total{device=sim:0,kind=guess}" in after  # exported
    # The process collector: what a soak (stt-loadtest) and a memory alert read.
    assert after["process_resident_memory_bytes{}"] > 50 * 1024 * 1024
    assert "stt_partial_gap_seconds_count{}" in after


# --- control socket -----------------------------------------------------------------------------


def test_control_requests_are_validated_without_a_socket() -> None:
    assert parse_request(b'{"cmd":"kick","session_id":"ab"}').reason == "kicked by operator"
    assert parse_request(b'{"cmd":"watch","interval":2}').interval == 2.0
    for bad, message in [
        (b"nope", "JSON object"),
        (b'{"cmd":"explode"}', "unknown cmd"),
        (b'{"cmd":"kick"}', 'needs "session_id"'),
        (b'{"cmd":"watch","interval":0}', "between"),
        (b'{"cmd":"set_max_connections","value":0}', "> 0"),
        (b'{"cmd":"set_max_connections","value":true}', "must be int"),
        (b'{"cmd":"reset_breaker","gpu":"0"}', "must be int"),
    ]:
        with pytest.raises(ControlError, match=message):
            parse_request(bad)


def test_peer_credentials_policy() -> None:
    assert peer_allowed(0, 0, "")  # root
    assert peer_allowed(os.geteuid(), os.getegid(), "")  # the server's own user
    assert not peer_allowed(54321, 54321, "")  # anyone else without a group
    assert not peer_allowed(54321, 54321, "no-such-group-here")
    assert peer_allowed(54321, 0, "root")  # primary group matches the configured one


@pytest.mark.parametrize("server_config", [{"simulate_gpus": "8000:0,8000:0"}], indirect=True)
async def test_every_control_command_over_a_real_unix_socket(
    nursery, speech_model, server_config, control_path, clip
) -> None:
    config = Config(**{**_fields(server_config), "control_socket": str(control_path)})
    shutdown = trio.Event()
    server = await nursery.start(
        functools.partial(serve, config, model=speech_model, shutdown=shutdown)
    )
    url = f"ws://127.0.0.1:{server.port}/"
    assert control_path.is_socket() and (control_path.stat().st_mode & 0o777) == 0o660
    with trio.fail_after(DEADLINE):
        control = await connect_control(control_path)
        async with open_websocket_url(url) as ws:
            hello = json.loads(await ws.get_message())
            snap = (await control.ask(cmd="snapshot"))["snapshot"]
            (session,) = snap["sessions"]
            assert session["session_id"] == hello["session_id"] and session["device"] == "sim:0"
            assert {
                "peer",
                "started",
                "audio_seconds",
                "last_partial_latency",
                "last_final_latency",
                "errors",
            } <= set(session)
            assert [g["device"] for g in snap["gpus"]] == ["sim:0", "sim:1"]
            assert snap["gpus"][0]["memory_total_mb"] == 8000
            assert snap["gpus"][0]["breaker"] == "closed"
            assert snap["max_connections"] == config.max_connections

            # kick: the client gets its open utterance's final, the reason, and 4000.
            await ws.send_message(clip("jfk.wav")[: 16000 * 2].tobytes())
            await wait_until(lambda: server.statistics().sessions[0].audio_seconds >= 2)
            assert await control.ask(
                cmd="kick", session_id=hello["session_id"], reason="abuse report #12"
            ) == {"ok": True}
            received, close = await receive_until_closed(ws)
        assert close == 4000
        assert any(m["type"] == "completed" and "fellow" in m["text"].lower() for m in received)
        assert received[-1] == {"type": "error", "code": "kicked", "message": "abuse report #12"}
        snap = (await control.ask(cmd="snapshot"))["snapshot"]
        assert [k["reason"] for k in snap["kicked"]] == ["abuse report #12"]
        assert snap["kicked"][0]["session_id"] == hello["session_id"]
        assert (await control.ask(cmd="kick", session_id="gone"))["ok"] is False

        assert await control.ask(cmd="set_max_connections", value=1) == {
            "ok": True,
            "max_connections": 1,
        }
        assert server.max_connections == 1

        server.pool.devices[1].breaker.trip("test")
        assert await control.ask(cmd="reset_breaker", gpu=1) == {"ok": True}
        assert server.pool.devices[1].breaker.state is BreakerState.CLOSED
        assert (await control.ask(cmd="reset_breaker", gpu=7))["ok"] is False

        assert await control.ask(cmd="drain") == {"ok": True}
        assert (await http_get(server.port, "/health"))[0] == 503
        assert (await control.ask(cmd="snapshot"))["snapshot"]["draining"] is True
        assert await control.ask(cmd="undrain") == {"ok": True}
        assert (await http_get(server.port, "/health"))[0] == 200

        assert (await control.ask(cmd="fly"))["error"].startswith("unknown cmd")

        watcher = await connect_control(control_path)
        await watcher.stream.send_all(b'{"cmd":"watch","interval":0.1}\n')
        snapshots = [await watcher.line() for _ in range(4)]
        assert all(s["ok"] and "sessions" in s["snapshot"] for s in snapshots)
        await watcher.stream.aclose()
        await control.stream.aclose()
    shutdown.set()


def _fields(config: Config) -> dict:
    import attrs

    return attrs.asdict(config)


async def test_a_stale_socket_file_is_replaced_and_a_live_one_is_not(
    nursery, speech_model, control_path
) -> None:
    control_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(control_path))
    stale.close()  # a server that died: the file stays, nobody listens
    config = Config(host="127.0.0.1", port=0, control_socket=str(control_path))
    shutdown = trio.Event()
    with trio.fail_after(DEADLINE):
        await nursery.start(functools.partial(serve, config, model=speech_model, shutdown=shutdown))
        control = await connect_control(control_path)
        assert (await control.ask(cmd="snapshot"))["ok"]
        # A second server must not steal the live socket.
        with pytest.raises(ControlError, match="another server"):
            await serve(config, model=speech_model)
        await control.stream.aclose()
    shutdown.set()


async def test_a_regular_file_at_the_socket_path_is_left_alone(speech_model, tmp_path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    config = Config(host="127.0.0.1", port=0, control_socket=str(path))
    with trio.fail_after(DEADLINE), pytest.raises(ControlError, match="not a socket"):
        await serve(config, model=speech_model)
    assert path.read_text() == "precious"


# --- drain ----------------------------------------------------------------------------------


@pytest.mark.parametrize("server_config", [{"shutdown_grace": 20.0}], indirect=True)
async def test_drain_lets_a_speaker_finish_the_utterance_then_closes_1001(
    running_server, clip
) -> None:
    server = running_server.server
    audio = clip("jfk.wav")  # "And so my fellow Americans," then a pause at about 2.6 s
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            received = []

            async def listen() -> None:
                try:
                    while True:
                        received.append(json.loads(await ws.get_message()))
                except ConnectionClosed as exc:
                    received.append({"close": exc.reason.code})

            async with trio.open_nursery() as inner:
                inner.start_soon(listen)
                for i in range(0, audio.size, 1600):
                    if i == 16000:  # 1 s in: mid-sentence
                        server.start_draining()
                        assert (await http_get(server.port, "/health"))[0] == 503
                    try:
                        await ws.send_message(audio[i : i + 1600].tobytes())
                    except ConnectionClosed:
                        break
                    await trio.sleep(0.1)
    finals = [m for m in received if m.get("type") == "completed"]
    assert len(finals) == 1 and "fellow" in finals[0]["text"].lower()
    assert finals[0]["end"] < 4.0  # closed at the first natural pause, not at the end of audio
    assert received[-2] == {"type": "error", "code": "going_away", "message": "server draining"}
    assert received[-1] == {"close": 1001}


@pytest.mark.parametrize("server_config", [{"shutdown_grace": 1.0}], indirect=True)
async def test_drain_finalizes_a_never_ending_utterance_at_the_grace_deadline(
    running_server, clip
) -> None:
    server = running_server.server
    with trio.fail_after(DEADLINE):
        async with open_websocket_url(running_server.url) as ws:
            await ws.get_message()
            # 1.5 s of speech and then nothing: the utterance never ends by itself.
            await ws.send_message(clip("jfk.wav")[:24000].tobytes())
            await wait_until(lambda: server.statistics().sessions[0].audio_seconds >= 1.5)
            start = trio.current_time()
            async with trio.open_nursery() as inner:
                inner.start_soon(server.drain)
                received, close = await receive_until_closed(ws)
            elapsed = trio.current_time() - start
    assert 0.9 <= elapsed < 10
    assert any(m["type"] == "completed" for m in received)
    assert received[-1]["code"] == "going_away" and close == 1001


# --- systemd ------------------------------------------------------------------------------------


async def test_ready_watchdog_and_stopping_reach_notify_socket(
    nursery, speech_model, tmp_path
) -> None:
    path = str(tmp_path / "notify.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    assert notifier.watchdog_interval == pytest.approx(0.1)
    shutdown = trio.Event()
    config = Config(host="127.0.0.1", port=0, control_socket="")
    got: list[str] = []
    with trio.fail_after(DEADLINE):
        nursery.start_soon(
            functools.partial(
                serve, config, model=speech_model, shutdown=shutdown, notifier=notifier
            )
        )
        while got.count("WATCHDOG=1") < 3:
            got.append((await sock.recv(1024)).decode())
        assert "READY=1" in got
        shutdown.set()
        while "STOPPING=1" not in got:
            got.append((await sock.recv(1024)).decode())
    sock.close()


def test_notifier_is_silent_outside_systemd_and_honours_watchdog_pid() -> None:
    assert not Notifier({}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).enabled
    assert (
        Notifier(
            {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        ).watchdog_interval
        is None
    )


# --- logging ------------------------------------------------------------------------------------


def test_json_logs_to_a_file_that_survives_rotation(tmp_path) -> None:
    path = tmp_path / "stt.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(Config(log_file=str(path), log_format="json", log_level="info"))
        logging.getLogger("stt_server.test").info("first %s", "line")
        path.rename(tmp_path / "stt.log.1")  # what logrotate does
        logging.getLogger("stt_server.test").warning("second")
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
    first = json.loads((tmp_path / "stt.log.1").read_text())
    assert first["message"] == "first line" and first["level"] == "info"
    assert first["logger"] == "stt_server.test" and first["time"].endswith("Z")
    assert json.loads(path.read_text())["message"] == "second"


# --- deployment kit -------------------------------------------------------------------------


def exported_names(metrics_text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(sample.name for sample in family.samples)
    return names


@pytest.mark.parametrize("server_config", [{"simulate_gpus": "8000:0"}], indirect=True)
async def test_dashboard_and_alerts_use_only_metrics_the_server_exports(
    running_server,
) -> None:
    with trio.fail_after(DEADLINE):
        _, _, body = await http_get(running_server.server.port, "/metrics")
    exported = exported_names(body.decode()) | {"up"}
    dashboard = json.loads((ROOT / "deploy/grafana/stt-server-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    alerts = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    exprs += re.findall(r"expr: (.+)", alerts)
    used = {name for e in exprs for name in re.findall(r"\b(stt_[a-z_]+|up)\b", e)}
    assert used, "no metric names found"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    # Every key metric the issue names is on the dashboard.
    for name in (
        "stt_sessions_active",
        "stt_gpu_memory_used_bytes",
        "stt_final_latency_seconds",
        "stt_partial_latency_seconds",
        "stt_errors_total",
        "stt_sessions_refused_total",
        "stt_breaker_state",
    ):
        assert any(name in e for e in exprs), name


def test_promtool_accepts_the_rules_and_scrape_config() -> None:
    # scripts/test.sh installs it (Debian package prometheus); missing is a failure, not a skip.
    assert shutil.which("promtool"), "promtool not installed"
    for args in (
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["check", "config", "deploy/prometheus/prometheus.yml"],
    ):
        proc = subprocess.run(["promtool", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_systemd_unit_verifies(tmp_path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze not installed (Debian: systemd)"
    unit = (ROOT / "systemd/stt-server.service").read_text()
    assert "Type=notify" in unit and "RuntimeDirectory=stt-server" in unit
    binary = Path(sys.executable).with_name("stt-server")
    unit = unit.replace("/opt/stt-server/.venv/bin/stt-server", str(binary))
    (tmp_path / "stt-server.service").write_text(unit)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "stt-server.service")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "stt-server.service" not in proc.stderr, proc.stderr


def test_example_config_file_is_accepted() -> None:
    config = Config.from_toml(ROOT / "deploy/config.toml")
    assert config.control_group == "stt-admin" and config.port == 8012
