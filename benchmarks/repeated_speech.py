"""One user says the same sentences again and again: final latency per utterance.

    python benchmarks/repeated_speech.py                    # this checkout
    python benchmarks/repeated_speech.py --tree /tmp/old    # another checkout (git worktree)

Streams jfk.wav four times at real-time pace, 2 s apart, to an ``stt-server`` started from
``--tree``, and prints each final's latency (the client's last audio of the utterance -> its
``completed``). Before the context's loop test was fixed, the server's context (the session's
last 20 s, with their text as a forced prefix) held the same words twice by the second reading,
faster-whisper took the repetition for a decoding loop and decoded each final up to six times
at rising temperatures: 4-15 s finals for a single user, the episodes of the 30-minute soak.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import trio

from stt_server.loadtest.client import read_wav, stream_audio
from stt_server.loadtest.clips import CLIPS_DIR
from stt_server.loadtest.local import free_port, server_command, wait_until_listening

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose server to run")
    parser.add_argument("--clip", default="jfk.wav")
    parser.add_argument("--times", type=int, default=4)
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(args.tree)}
    command = server_command(port, "--control-socket", "", "--log-level", "warning")
    server = subprocess.Popen(command, env=env, cwd=args.tree)
    try:
        if not wait_until_listening(port, 120):
            raise SystemExit("server did not start")
        clip = read_wav(CLIPS_DIR / args.clip)
        pause = np.zeros(2 * 16000, dtype="<i2")
        samples = np.concatenate([clip, pause] * args.times)
        url = f"ws://127.0.0.1:{port}/"
        result = trio.run(lambda: stream_audio(url, samples, trailing_silence=1.0))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    latencies = result.final_latencies()
    print(f"{args.tree}: {args.clip} x{args.times}, {len(latencies)} finals")
    print("final latency (s):", " ".join(f"{x:.2f}" for x in latencies))
    print(f"max {max(latencies):.2f} s")


if __name__ == "__main__":
    main()
