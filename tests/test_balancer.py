"""Several instances behind a real nginx and a real HAProxy, from the shipped configurations
(deploy/nginx/stt.conf, deploy/haproxy/stt.cfg) with only addresses, ports, certificates, log
paths and timers rewritten: stt-loadtest's users, bound to loopback addresses in different /24s,
are spread by client address, keep their sessions through minutes of silence (pings), and
move to the other instance when one drains, without losing a transcript.

The balancers run in the foreground as children of the test, with every path in a temporary
directory, and are killed at the end. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from stt_server.loadtest.client import connect
from stt_server.loadtest.clips import CLIPS_DIR
from stt_server.loadtest.corpus import Clip, load_corpus
from stt_server.loadtest.events import SessionStarted
from stt_server.loadtest.local import free_port, server_command, wait_until_listening
from stt_server.loadtest.scrape import ScrapeError, fetch_metrics, labelled, parse_metrics
from stt_server.loadtest.stats import summarize
from stt_server.loadtest.users import LoadSettings, LoadTest

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "deploy" / "nginx" / "stt.conf"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "stt.cfg"

#: Whole-test bound: a hang fails instead of stalling the suite.
DEADLINE = 120
#: The users speak for this long, at 1.5 x real time; instance A is taken out at DRAIN_AT.
RUNTIME, SPEED, DRAIN_AT = 16.0, 1.5, 6.0
#: The balancers' idle timeouts in the test copies, and how long the silent user stays silent:
#: longer, so that only the server's pings (every PING_INTERVAL) can keep its session open.
PROXY_TIMEOUT, SILENT_PAUSE, PING_INTERVAL = 3, 6.0, 1.0
#: Client addresses in different /24s (nginx's ip_hash keys on the first three octets).
CANDIDATES = tuple(f"127.{a}.{b}.1" for a, b in ((0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0)))


def binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is required (Debian package); scripts/test.sh installs it")
    return path


@attrs.define(eq=False)
class Instance:
    name: str
    port: int
    control: Path
    log: Path
    process: subprocess.Popen

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[tuple[Instance, Instance]]:
    """Two stt-server processes trusting the balancer on 127.0.0.1, pinging every second."""
    started = []
    try:
        for name in ("a", "b"):
            port = free_port()
            control = tmp_path / f"control-{name}" / "control.sock"
            log = tmp_path / f"server-{name}.log"
            cmd = server_command(
                port,
                *("--trusted-proxies", "127.0.0.1", "--control-socket", str(control)),
                # One inference worker each: two instances share this machine's two cores.
                *("--ping-interval", str(PING_INTERVAL), "--inference-workers", "1"),
            )
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env()
                )
            started.append(Instance(name, port, control, log, proc))
        for instance in started:
            assert wait_until_listening(instance.port, 60), instance.log.read_text()[-2000:]
        yield started[0], started[1]
    finally:
        for instance in started:
            instance.process.terminate()
        for instance in started:
            try:
                instance.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                instance.process.kill()
                instance.process.wait()


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@attrs.frozen
class Tls:
    ca: Path
    chain: Path
    key: Path
    combined: Path  # key and chain in one file, as HAProxy wants it

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    out = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = Tls(out / "ca.pem", out / "chain.pem", out / "key.pem", out / "combined.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    cert.private_key_pem.write_to_path(str(files.key))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(files.chain), append=i > 0)
    cert.private_key_and_cert_chain_pem.write_to_path(str(files.combined))
    return files


@pytest.fixture(scope="module")
def corpus() -> list[Clip]:
    return [
        c for c in load_corpus(CLIPS_DIR / "manifest.tsv") if c.name in ("jfk.wav", "ldc93s1.wav")
    ]


# -- the two balancers, from the shipped files ---------------------------------------------
def render_nginx(
    out: Path, a: Instance, b: Instance, ports: tuple[int, int], tls: Tls, *, a_down: bool
) -> Path:
    """deploy/nginx/stt.conf with test addresses, ports, certificates, logs and timeouts, in a
    main nginx.conf that keeps every path in ``out``."""
    http_port, https_port = ports
    text = NGINX_CONF.read_text()
    down = " down" if a_down else ""
    text = re.sub(r"server 10\.0\.0\.11:8012 (.*?);", rf"server 127.0.0.1:{a.port} \1{down};", text)
    text = text.replace("server 10.0.0.12:8012", f"server 127.0.0.1:{b.port}")
    text = text.replace("10.0.0.11:8012", f"127.0.0.1:{a.port}")  # the per-instance map
    text = text.replace("10.0.0.12:8012", f"127.0.0.1:{b.port}")
    text = re.sub(r"\n\s*listen \[::\].*;", "", text)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    text = text.replace("/etc/ssl/stt/fullchain.pem", str(tls.chain))
    text = text.replace("/etc/ssl/stt/privkey.pem", str(tls.key))
    text = text.replace("/var/log/nginx/stt.access.log", str(out / "access.log"))
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        text, n = re.subn(rf"{timeout} 3600s;", f"{timeout} {PROXY_TIMEOUT}s;", text)
        assert n == 1, f"{timeout} 3600s not found in {NGINX_CONF}"
    live = [line for line in text.splitlines() if not line.strip().startswith("#")]
    assert not [line for line in live if "10.0.0." in line and "allow" not in line], live
    (out / "stt.conf").write_text(text)
    main = out / "nginx.conf"
    main.write_text(
        f"daemon off;\nworker_processes 1;\npid {out}/nginx.pid;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {out}/access-main.log;\n"
        f"    client_body_temp_path {out}/body; proxy_temp_path {out}/proxy;\n"
        f"    fastcgi_temp_path {out}/fastcgi; uwsgi_temp_path {out}/uwsgi;\n"
        f"    scgi_temp_path {out}/scgi;\n"
        f"    include {out}/stt.conf;\n"
        "}\n"
    )
    return main


def render_haproxy(out: Path, a: Instance, b: Instance, ports: tuple[int, int], tls: Tls) -> Path:
    """deploy/haproxy/stt.cfg with test addresses, ports, certificate, log and faster checks."""
    http_port, https_port = ports
    text = HAPROXY_CFG.read_text()
    text = re.sub(r"^\s*(chroot|user|group|daemon)\b.*\n", "", text, flags=re.M)
    text = text.replace("log /dev/log local0", "log stderr format raw local0")
    text = text.replace("maxconn 4096", "maxconn 256")  # within a test runner's file limit
    text = text.replace("/run/haproxy/admin.sock", str(out / "admin.sock"))
    text = text.replace("/etc/haproxy/certs/stt.pem", str(tls.combined))
    text = text.replace("bind :80\n", f"bind 127.0.0.1:{http_port}\n")
    text = text.replace("bind :443 ", f"bind 127.0.0.1:{https_port} ")
    text = text.replace("10.0.0.11:8012", f"127.0.0.1:{a.port}")
    text = text.replace("10.0.0.12:8012", f"127.0.0.1:{b.port}")
    # Checks every 100 ms: the drain is seen before a user sent away can reconnect (0.2 s).
    text, n = re.subn(r"inter 2s fall 2 rise 2", "inter 100 fall 1 rise 1", text)
    assert n == 1
    text, n = re.subn(r"timeout tunnel 1h", f"timeout tunnel {PROXY_TIMEOUT}s", text)
    assert n == 1
    path = out / "stt.cfg"
    path.write_text(text)
    return path


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


async def start_balancer(
    nursery: trio.Nursery, cmd: list[str], port: int, log: Path
) -> trio.Process:
    """Run ``cmd`` in the foreground until the nursery is cancelled (then it is killed)."""
    with log.open("wb") as out:
        process = await nursery.start(
            functools.partial(
                trio.run_process, cmd, stdout=out, stderr=subprocess.STDOUT, check=False
            )
        )
    with trio.fail_after(15):
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                break
            except OSError:
                assert process.returncode is None, tail(log)
                await trio.sleep(0.1)
    return process


# -- talking to the instances --------------------------------------------------------------
async def control(instance: Instance, request: dict) -> dict:
    stream = await trio.open_unix_socket(str(instance.control))
    async with stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            assert chunk, "control socket closed"
            data += chunk
    return json.loads(data)


async def peers(instance: Instance) -> list[str]:
    reply = await control(instance, {"cmd": "snapshot"})
    return [s["peer"] for s in reply["snapshot"]["sessions"]]


async def counts(instance: Instance) -> dict[str, float]:
    return parse_metrics(await fetch_metrics(instance.metrics_url))


def accepted(values: dict[str, float]) -> int:
    return round(values.get("stt_sessions_accepted_total", 0))


async def where_addresses_land(url: str, context: ssl.SSLContext, a: Instance) -> dict[str, str]:
    """Open one session through the balancer from each candidate address and ask instance A
    whether it holds it: this also shows that the balancer's X-Forwarded-For reached the
    server (its peer reads '<address> via 127.0.0.1:...')."""
    out = {}
    for address in CANDIDATES:
        async with connect(url, source_address=address, ssl_context=context) as stream:
            assert isinstance(await stream.receive(), SessionStarted)
            on_a = any(p.startswith(f"{address} via 127.0.0.1:") for p in await peers(a))
            out[address] = "a" if on_a else "b"
    return out


async def run_users(
    settings: LoadSettings, corpus: list[Clip], during: Callable[[], Awaitable[None]]
) -> dict:
    test = LoadTest(settings, corpus)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(during)
        stats = await test.run()
    return summarize(stats, settings.describe(), test.elapsed)


def users_settings(
    url: str, tls: Tls, a: Instance, b: Instance, addresses: tuple[str, ...]
) -> LoadSettings:
    return LoadSettings(
        url=url,
        clients=len(addresses),
        concurrent=len(addresses),
        runtime=RUNTIME,
        speed=SPEED,
        seed=13,
        pause=(1.5, 2.5),
        silent_users=1,
        silent_pause=SILENT_PAUSE,
        source_addresses=addresses,
        finish_timeout=20.0,
        metrics_urls=(a.metrics_url, b.metrics_url),
        sample_interval=2.0,
        warmup=0.0,
        cafile=str(tls.ca),
    )


def check_drained_run(
    report: dict, addresses: tuple[str, ...], on_a: list[str], a_before: int, a_after: int
) -> None:
    """What a drain must look like to the users: A's users were sent away once and came back
    elsewhere, A took nobody new, nobody lost a transcript, transcripts are right, and the
    silent user kept its one session through silences longer than the balancer's timeout.
    (A clip spoken after A had stopped listening, before its going_away arrived, is counted
    apart by the report as clips_dropped_at_close; see stt_server/loadtest/stats.py.)"""
    assert a_after == a_before, "instance A accepted sessions after it was taken out"
    users = report["per_user"]
    for user in users:
        if user["source_address"] in on_a:
            assert user["closes"].get("1001") == 1, user
            assert user["errors"].get("going_away") == 1, user
            assert user["sessions_accepted"] == 2, user  # one on A, then one on B
        else:
            assert user["sessions_accepted"] == 1 and user["closes"] == {"1000": 1}, user
    silent = users[-1]
    assert silent["silent"] and silent["source_address"] not in on_a
    assert silent["attempts"] == 1 and silent["closes"] == {"1000": 1}, silent
    assert silent["utterances_finalized"] >= 1, silent
    assert report["utterances_lost"] == 0 and report["clips_unfinalized"] == 0, [
        (u["source_address"], u["closes"], u["unfinalized_clips"]) for u in users
    ]
    assert report["client_errors"] == {} and report["errors_total"] == 0, users
    assert report["clips_complete"] >= len(addresses) and report["wer"] <= 0.2, users
    assert report["sessions_accepted"] == len(addresses) + len(on_a)


# -- the tests -----------------------------------------------------------------------------
async def test_nginx_spreads_users_drains_one_instance_and_keeps_silent_sessions(
    instances: tuple[Instance, Instance], tls: Tls, corpus: list[Clip], tmp_path: Path
) -> None:
    a, b = instances
    out = tmp_path / "nginx"
    out.mkdir()
    ports = (free_port(), free_port())
    conf = render_nginx(out, a, b, ports, tls, a_down=False)
    cmd = [binary("nginx"), "-c", str(conf), "-p", str(out), "-e", str(out / "error.log")]
    base = f"https://127.0.0.1:{ports[1]}"
    url = f"wss://127.0.0.1:{ports[1]}/"
    context = tls.client_context()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nginx = await start_balancer(nursery, cmd, ports[1], out / "nginx.out")

            # Routes: /health through the balancer, per-instance metrics, no public /metrics.
            health = json.loads(await fetch_metrics(f"{base}/health", ssl_context=context))
            assert health["status"] == "ok"
            text = await fetch_metrics(f"{base}/instances/1/metrics", ssl_context=context)
            assert "stt_sessions_accepted_total" in text
            with pytest.raises(ScrapeError, match="HTTP 404"):
                await fetch_metrics(f"{base}/metrics", ssl_context=context)

            where = await where_addresses_land(url, context, a)
            on_a = [x for x in CANDIDATES if where[x] == "a"][:2]
            on_b = [x for x in CANDIDATES if where[x] == "b"][:2]
            assert len(on_a) == 2 and len(on_b) == 2, where
            # Users 0 and 2 on A, 1 and 3 on B; the last one is the silent one.
            addresses = (on_a[0], on_b[0], on_a[1], on_b[1])
            drained: dict[str, int] = {}

            async def take_a_out() -> None:
                await trio.sleep(DRAIN_AT)
                assert sorted(p.split(" via ")[0] for p in await peers(a)) == sorted(on_a)
                drained["a"] = accepted(await counts(a))
                render_nginx(out, a, b, ports, tls, a_down=True)
                nginx.send_signal(signal.SIGHUP)  # reload: new users go to B
                await trio.sleep(1.0)
                assert (await control(a, {"cmd": "drain"}))["ok"]

            b_start = accepted(await counts(b))
            report = await run_users(users_settings(url, tls, a, b, addresses), corpus, take_a_out)
            a_values = await counts(a)
            check_drained_run(report, addresses, on_a, drained["a"], accepted(a_values))
            assert labelled(a_values, "stt_sessions_refused_total").get("draining", 0) == 0
            assert accepted(await counts(b)) - b_start == len(addresses)  # 2, then A's 2

            # Passive health check: A is gone; with A back in the list (not marked down), its
            # users' connections are refused there and nginx tries B instead.
            a.process.terminate()
            await trio.to_thread.run_sync(a.process.wait, 30)
            render_nginx(out, a, b, ports, tls, a_down=False)
            nginx.send_signal(signal.SIGHUP)
            await trio.sleep(1.0)
            b_before = accepted(await counts(b))
            settings = attrs.evolve(
                users_settings(url, tls, a, b, tuple(on_a)),
                runtime=4.0,
                silent_users=0,
                metrics_urls=(b.metrics_url,),
            )
            report = await run_users(settings, corpus, trio.lowlevel.checkpoint)
            assert report["sessions_accepted"] == 2 and report["client_errors"] == {}, report
            assert accepted(await counts(b)) - b_before == 2
            nursery.cancel_scope.cancel()


async def test_haproxy_health_checks_move_new_users_off_a_draining_instance(
    instances: tuple[Instance, Instance], tls: Tls, corpus: list[Clip], tmp_path: Path
) -> None:
    a, b = instances
    out = tmp_path / "haproxy"
    out.mkdir()
    ports = (free_port(), free_port())
    cfg = render_haproxy(out, a, b, ports, tls)
    check = await trio.run_process(
        [binary("haproxy"), "-c", "-f", str(cfg)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr.decode()
    url = f"wss://127.0.0.1:{ports[1]}/"
    context = tls.client_context()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await start_balancer(
                nursery, [binary("haproxy"), "-f", str(cfg), "-db"], ports[1], out / "haproxy.log"
            )
            health = f"https://127.0.0.1:{ports[1]}/health"
            assert json.loads(await fetch_metrics(health, ssl_context=context))["status"] == "ok"
            where = await where_addresses_land(url, context, a)
            on_a = [x for x in CANDIDATES if where[x] == "a"][:2]
            on_b = [x for x in CANDIDATES if where[x] == "b"][:2]
            assert len(on_a) == 2 and len(on_b) == 2, where
            addresses = (on_a[0], on_b[0], on_a[1], on_b[1])
            drained: dict[str, int] = {}

            async def take_a_out() -> None:
                await trio.sleep(DRAIN_AT)
                assert sorted(p.split(" via ")[0] for p in await peers(a)) == sorted(on_a)
                drained["a"] = accepted(await counts(a))
                # Only the drain: HAProxy's /health checks see the 503 by themselves.
                assert (await control(a, {"cmd": "drain"}))["ok"]

            b_start = accepted(await counts(b))
            report = await run_users(users_settings(url, tls, a, b, addresses), corpus, take_a_out)
            check_drained_run(report, addresses, on_a, drained["a"], accepted(await counts(a)))
            assert accepted(await counts(b)) - b_start == len(addresses)  # 2, then A's 2
            log = tail(out / "haproxy.log")
            assert re.search(r"stt1 is DOWN.*503", log), log
            nursery.cancel_scope.cancel()
