"""Transcribe a WAV file with OpenAI's own client, through stt-server's Realtime endpoint.

pip install "openai[realtime]"
python openai_realtime.py speech.wav [ws://127.0.0.1:8012/v1]
"""

import base64
import sys
import wave

from openai import OpenAI

path = sys.argv[1]
url = sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8012/v1"
# The server's token goes where an OpenAI key would (any text when it has no tokens_file).
client = OpenAI(api_key="YOUR_TOKEN", websocket_base_url=url)

with wave.open(path) as wav:  # 16-bit mono PCM
    rate, pcm = wav.getframerate(), wav.readframes(wav.getnframes())

with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
    connection.session.update(
        session={
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": rate},  # OpenAI itself takes 24000
                    "transcription": {"language": "en"},
                    "turn_detection": None,  # no server VAD: one item per commit
                }
            },
        }
    )
    step = rate // 10 * 2  # 100 ms of 16-bit samples per event
    for i in range(0, len(pcm), step):
        connection.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + step]).decode())
    connection.input_audio_buffer.commit()
    for event in connection:
        if event.type == "conversation.item.input_audio_transcription.delta":
            print(event.delta, end="", flush=True)  # live text, appended
        elif event.type == "conversation.item.input_audio_transcription.completed":
            print(f"\nfinal: {event.transcript}")
            break
        elif event.type == "error":
            sys.exit(event.error.message)
