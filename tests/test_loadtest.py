"""stt-loadtest: its sans-IO parts without an event loop, then the real command against a live
server, checked against what the server's own /metrics counted."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, serve_websocket

from stt_server.loadtest.client import Endpoint, Stream, connect
from stt_server.loadtest.clips import CLIPS_DIR
from stt_server.loadtest.conditions import (
    ConditionError,
    check_names,
    failed,
    parse_conditions,
)
from stt_server.loadtest.corpus import Clip, CorpusError, load_corpus
from stt_server.loadtest.events import Closed, Final, Partial, ServerError, SessionStarted, decode
from stt_server.loadtest.scrape import ServerSample, memory_report, parse_metrics
from stt_server.loadtest.stats import RunStats, SessionTally, UserRecord, percentile, summarize
from stt_server.loadtest.users import LoadSettings, LoadTest, expand_addresses

ROOT = Path(__file__).resolve().parents[1]

#: Every run of the command gets this long before the test fails instead of hanging.
DEADLINE = 90


# -- sans-IO -------------------------------------------------------------------------------
def test_events_decode_every_server_message() -> None:
    assert decode('{"type":"session","session_id":"a","sample_rate":16000,"model":"m"}', 1.0) == (
        SessionStarted(1.0, "a", 16000, "m")
    )
    assert decode('{"type":"realtime","text":"hi","utterance_id":2,"x":1}', 2.0) == Partial(
        2.0, "hi", 2
    )
    final = decode('{"type":"completed","text":"Hi.","utterance_id":2,"start":1,"end":2.5}', 3)
    assert final == Final(3, "Hi.", 2, 1.0, 2.5)
    error = decode('{"type":"error","code":"server_busy","message":"m","retry_after":5}', 4)
    assert error == ServerError(4, "server_busy", "m", 5.0)
    # Unknown types, known types with broken fields and non-JSON are kept, never fatal.
    for raw in ('{"type":"future"}', '{"type":"completed","text":"x"}', "[1]", "not json"):
        assert type(decode(raw, 5)).__name__ == "Unknown"


def test_conditions_parse_and_hold() -> None:
    report = summarize(RunStats([]), {}, 0.0)  # every key, nothing measured
    conds = parse_conditions(["p95_final_latency>1.5, error_rate>=0.01", "wer<0.5"])
    assert [(c.name, c.op, c.threshold) for c in conds] == [
        ("final_latency_p95_s", ">", 1.5),
        ("error_rate", ">=", 0.01),
        ("wer", "<", 0.5),
    ]
    check_names(conds, report)
    # Nothing measured: a gate must not pass on a run that measured nothing.
    assert len(failed(conds, report)) == 3
    measured = {**report, "final_latency_p95_s": 1.2, "error_rate": 0.0, "wer": 0.8}
    assert failed(conds, measured) == []
    assert [c.text for c, _ in failed(conds, {**measured, "final_latency_p95_s": 1.51})] == [
        "p95_final_latency>1.5"
    ]
    with pytest.raises(ConditionError):
        parse_conditions(["p95 > fast"])
    with pytest.raises(ConditionError, match="unknown figure"):
        check_names(parse_conditions(["p59_final_latency>1"]), report)


def test_tally_assigns_finals_to_clips_and_finds_lost_utterances() -> None:
    tally = SessionTally()
    tally.start_clip("a", "hello world", 0.5)
    tally.end_clip(3.0, complete=True)
    tally.start_clip("b", "good night", 5.0)
    tally.end_clip(7.0, complete=True)
    tally.start_clip("c", "never mind", 9.0)
    tally.on_partial(Partial(1.0, "hel", 1))
    assert tally.on_partial(Partial(1.5, "hello", 1)) == pytest.approx(0.5)
    tally.on_final(Final(2.0, "Hello world.", 1, 0.2, 3.3))  # padding spills past the clip
    tally.on_partial(Partial(6.0, "good", 2))
    tally.on_final(Final(7.5, "Good night.", 2, 4.7, 7.3))
    tally.on_partial(Partial(9.5, "never", 3))  # shown, then the session ended: lost
    tally.interrupt(9.6)
    tally.assign_finals()
    assert [c.texts for c in tally.clips] == [["Hello world."], ["Good night."], []]
    assert [c.complete for c in tally.clips] == [True, True, False]
    assert tally.lost_utterances() == 1

    stats = RunStats([UserRecord(0)])
    stats.finish_session(stats.users[0], tally)
    user = stats.users[0]
    assert (user.clips_complete, user.clips_unfinalized, user.wer_words) == (2, 0, 4)
    assert user.wer_errors == 0 and user.lost_utterances == 1


def test_memory_from_metrics_text() -> None:
    def sample(at: float, rss_mib: float, gpu_mib: float) -> ServerSample:
        text = (
            "# TYPE process_resident_memory_bytes gauge\n"
            f"process_resident_memory_bytes {rss_mib * 2**20}\n"
            "# TYPE stt_gpu_memory_used_bytes gauge\n"
            f'stt_gpu_memory_used_bytes{{device="cuda:0"}} {gpu_mib / 2 * 2**20}\n'
            f'stt_gpu_memory_used_bytes{{device="cuda:1"}} {gpu_mib / 2 * 2**20}\n'
            "# TYPE stt_sessions_refused counter\n"
            'stt_sessions_refused_total{reason="draining"} 3.0\n'
        )
        return ServerSample(at, "http://a/metrics", parse_metrics(text))

    values = sample(0, 1, 1).values
    assert values['stt_sessions_refused_total{reason="draining"}'] == 3.0
    # Medians over a minute after the warm-up (20 s) and over the last minute.
    readings = [(0, 300), (30, 400), (40, 380), (50, 420), (100, 410), (130, 430), (140, 400)]
    report = memory_report([sample(t, rss, 1000 + t) for t, rss in readings], 20)
    figures = report["instances"]["http://a/metrics"]
    assert figures["resident"] == {
        "start_mb": 300.0,
        "after_warmup_mb": 400.0,
        "end_mb": 410.0,
        "max_mb": 430.0,
        "growth_after_warmup_pct": 2.5,
        "window_s": 60.0,
    }
    assert figures["gpu_used"]["end_mb"] == 1130.0
    assert report["max_growth_after_warmup_pct"] == figures["gpu_used"]["growth_after_warmup_pct"]
    # A server that does not export it gets nulls and a note, not a guess.
    bare = ServerSample(0, "http://b/metrics", parse_metrics("stt_sessions_active 1\n"))
    assert memory_report([bare], 0)["instances"]["http://b/metrics"]["resident"] is None


def test_addresses_urls_and_percentiles() -> None:
    assert expand_addresses("127.0.1.1, 127.0.0.2-127.0.0.4") == (
        "127.0.1.1",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
    )
    with pytest.raises(ValueError):
        expand_addresses("127.0.0.9-127.0.0.2")
    endpoint = Endpoint.from_url("wss://stt.example.com/v1/realtime?intent=transcription")
    assert (endpoint.port, endpoint.resource, endpoint.host_header) == (
        443,
        "/v1/realtime?intent=transcription",
        "stt.example.com",
    )
    assert Endpoint.from_url("ws://127.0.0.1:8012/").http_url("/metrics") == (
        "http://127.0.0.1:8012/metrics"
    )
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == pytest.approx(np.percentile([1, 2, 3, 4], 50))
    assert percentile([], 95) is None


def test_corpus_from_directory_and_manifest(tmp_path: Path) -> None:
    assert [c.name for c in load_corpus()] == ["jfk.wav", "ldc93s1.wav", "cats.wav", "lucier.wav"]
    # A directory of FLAC (44.1 kHz stereo) with a sidecar transcript.
    subprocess.run(
        ["sox", str(CLIPS_DIR / "ldc93s1.wav"), "-r", "44100", "-c", "2", str(tmp_path / "x.flac")],
        check=True,
    )
    (tmp_path / "x.txt").write_text("She had your dark suit.\n")
    (clip,) = load_corpus(tmp_path)
    assert clip.reference == "She had your dark suit."
    assert clip.samples.dtype == np.int16 and abs(clip.seconds - 2.92) < 0.05
    manifest = tmp_path / "m.tsv"
    manifest.write_text("file\treference_transcript\nx.flac\t\n")
    assert load_corpus(manifest)[0].reference is None
    with pytest.raises(CorpusError):
        load_corpus(tmp_path / "missing")


# -- the client against a live server ------------------------------------------------------
async def test_client_yields_events_while_it_streams(running_server, clip) -> None:
    """Partials arrive while audio is still going out, from the source address asked for."""
    seen: list[tuple[str, float]] = []
    with trio.fail_after(DEADLINE):
        async with connect(running_server.url, source_address="127.0.0.7", binary=True) as stream:
            assert isinstance(stream, Stream)
            first = await stream.receive()
            assert isinstance(first, SessionStarted)
            peers = [s.peer for s in running_server.server.sessions.values()]
            assert peers and peers[0].startswith("127.0.0.7:")

            async def listen() -> None:
                async for event in stream:
                    seen.append((type(event).__name__, stream.sent_seconds))
                    if isinstance(event, Final):
                        latency = stream.latency(event)
                        assert latency is not None and 0 < latency < 10

            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                await stream.stream(clip("jfk.wav"), speed=3.0)
                await stream.silence(1.0, speed=3.0)
                await stream.end()
    kinds = [k for k, _ in seen]
    assert kinds[-1] == "Closed" and "Final" in kinds
    # The first partial came while less than the whole clip had been sent.
    first_partial = next(sent for kind, sent in seen if kind == "Partial")
    assert first_partial < clip("jfk.wav").size / 16000
    assert isinstance(stream.closed, Closed) and stream.closed.code == 1000


# -- the command against a live server -----------------------------------------------------
def manifest(tmp_path: Path, names: list[str], references: dict[str, str]) -> Path:
    path = tmp_path / "clips.tsv"
    rows = [f"{CLIPS_DIR / n}\t{references[n]}" for n in names]
    path.write_text("file\treference_transcript\n" + "\n".join(rows) + "\n")
    return path


async def run_loadtest(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with trio.fail_after(DEADLINE):
        return await trio.run_process(
            [sys.executable, "-m", "stt_server.loadtest", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
            env=env,
        )


def server_counts(server) -> dict[str, dict[str, float]]:
    """The server's counters, read from its own /metrics rendering."""
    body, _ = server.metrics.render()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name.endswith("_total"):
                key = s.labels.get("reason") or s.labels.get("code") or ""
                out.setdefault(s.name, {})[key] = s.value
    return out


def delta(before: dict, after: dict, name: str) -> dict[str, int]:
    a, b = before.get(name, {}), after.get(name, {})
    out = {k: round(b.get(k, 0) - a.get(k, 0)) for k in set(a) | set(b)}
    return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("server_config", [{"max_connections": 2}], indirect=True)
async def test_report_agrees_with_server_metrics(running_server, references, tmp_path) -> None:
    """Three users for two places: the report's sessions, refusals, finals and errors are the
    server's own counts, the transcripts are right, and nothing is lost."""
    server = running_server.server
    audio = manifest(tmp_path, ["jfk.wav", "ldc93s1.wav"], references)
    out, plot = tmp_path / "report.json", tmp_path / "run.png"
    before = server_counts(server)
    done = await run_loadtest(
        *("--url", running_server.url, "--clients", "3", "--concurrent", "3"),
        *("--runtime", "8", "--speed", "2", "--pause", "0.5:1", "--seed", "1"),
        *("--audio", str(audio), "--json", str(out), "--plot", str(plot)),
        *("--sample-interval", "2", "--fail-if", "p95_final_latency>30,error_rate>0.5"),
    )
    after = server_counts(server)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(out.read_text())

    accepted = delta(before, after, "stt_sessions_accepted_total")
    refused = delta(before, after, "stt_sessions_refused_total")
    assert report["sessions_accepted"] == accepted[""] == 2
    assert report["sessions_refused"] == sum(refused.values()) >= 1
    assert report["sessions_refused_by_reason"] == {"server_busy": refused["max_connections"]}
    assert (
        report["utterances_finalized"]
        == (delta(before, after, "stt_utterances_finalized_total")[""])
    )
    assert report["errors"] == delta(before, after, "stt_errors_total")
    # The report's own reading of /metrics says the same.
    assert report["server"]["sessions_accepted"] == 2
    assert report["server"]["utterances_finalized"] == report["utterances_finalized"]

    assert report["client_errors"] == {} and report["errors_total"] == 0
    assert report["utterances_lost"] == 0 and report["clips_unfinalized"] == 0
    assert report["clips_complete"] >= 2 and report["wer"] is not None
    assert report["wer"] <= 0.2, report["per_user"]
    p50, p95, p99 = (report[f"final_latency_p{q}_s"] for q in (50, 95, 99))
    assert 0 < p50 <= p95 <= p99 < 10
    assert len(report["per_user"]) == 3 and report["reconnects"] >= 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stt-loadtest summary" in done.stdout.decode()


async def test_fail_if_fails_when_it_should(running_server, references, tmp_path) -> None:
    audio = manifest(tmp_path, ["ldc93s1.wav"], references)
    common = ("--url", running_server.url, "--clients", "1", "--audio", str(audio), "--quiet")
    done = await run_loadtest(
        *common, "--runtime", "4", "--speed", "2", "--fail-if", "p95_final_latency>0.05"
    )
    assert done.returncode == 1, done.stderr.decode()[-3000:]
    assert "FAIL p95_final_latency>0.05 (measured " in done.stderr.decode()
    # A condition on a figure that does not exist is a usage error, before any load.
    typo = await run_loadtest(*common, "--runtime", "4", "--fail-if", "p59_final_latency>1")
    assert typo.returncode == 2 and "unknown figure" in typo.stderr.decode()


# -- the Locust file -----------------------------------------------------------------------
def locust_command() -> str | None:
    beside = Path(sys.executable).with_name("locust")
    return str(beside) if beside.exists() else shutil.which("locust")


async def test_locustfile_speaks_the_protocol(running_server, tmp_path) -> None:
    """deploy/locust/locustfile.py under Locust itself: sessions open, finals come back and are
    reported as the 'final latency' metric, no failures."""
    locust = locust_command()
    if locust is None:
        pytest.skip("locust is not installed (pip install locust)")
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("jfk.wav", "ldc93s1.wav"):
        (audio / name).symlink_to(CLIPS_DIR / name)
    with trio.fail_after(DEADLINE):
        done = await trio.run_process(
            [
                *(locust, "-f", str(ROOT / "deploy" / "locust" / "locustfile.py")),
                *("--headless", "--users", "2", "--spawn-rate", "2", "--run-time", "8s"),
                *("--host", running_server.url, "--stt-speed", "2", "--stt-audio", str(audio)),
                *("--csv", str(tmp_path / "run"), "--only-summary"),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=tmp_path,
        )
    output = (done.stdout + done.stderr).decode(errors="replace")
    with (tmp_path / "run_stats.csv").open() as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    assert int(rows["session"]["Request Count"]) == 2, output[-3000:]
    assert int(rows["Aggregated"]["Failure Count"]) == 0, output[-3000:]
    finals = rows["final latency"]
    assert int(finals["Request Count"]) >= 2, output[-3000:]
    assert 0 < float(finals["Median Response Time"]) < 10_000


# -- the users against a scripted server ----------------------------------------------------
async def test_a_user_sent_away_while_sending_comes_back() -> None:
    """The server says going_away and closes while the user is in the middle of a clip. The
    user's next send then fails before its listener has read the close: that is still the
    server ending the session, so the user reconnects instead of ending its run."""
    sessions: list[str] = []

    async def handler(request) -> None:
        ws = await request.accept()
        sessions.append("sent away" if not sessions else "stayed")
        await ws.send_message(json.dumps({"type": "session", "session_id": str(len(sessions))}))
        if sessions[-1] == "sent away":
            for _ in range(5):
                await ws.get_message()
            going_away = {"type": "error", "code": "going_away", "message": "draining"}
            await ws.send_message(json.dumps(going_away))
            await ws.aclose(1001)
            return
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await ws.get_message()
                if isinstance(message, str) and json.loads(message)["type"] == "end":
                    await ws.aclose(1000)
                    return

    clip = Clip("tone", (np.sin(np.arange(16000 * 3) / 10) * 8000).astype(np.int16), "x")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(serve_websocket, handler, "127.0.0.1", 0, ssl_context=None)
            )
            port = listeners.port
            settings = LoadSettings(
                url=f"ws://127.0.0.1:{port}/",
                clients=1,
                concurrent=1,
                runtime=3.0,
                speed=0,
                binary=True,
                pause=(0.0, 0.0),
                finish_timeout=5.0,
                warmup=0.0,
            )
            stats = await LoadTest(settings, [clip]).run()
            nursery.cancel_scope.cancel()
    user = stats.users[0]
    assert sessions == ["sent away", "stayed"]
    assert user.attempts == 2 and user.accepted == 2, user
    assert user.errors["going_away"] == 1 and user.closes == {"1001": 1, "1000": 1}, user
    assert user.client_errors == {}, user
