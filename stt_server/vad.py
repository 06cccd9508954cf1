"""Streaming Silero voice activity detection, using the model faster-whisper ships.

faster-whisper runs Silero over a whole file at once. The ONNX graph it ships treats its batch
dimension as time and threads the LSTM state (``h``, ``c``) through it, so feeding the same
windows in pieces while carrying ``h``, ``c`` and the 64-sample context gives bit-identical
probabilities: the same float32 values whether the audio arrives whole, in chunks that never
line up with windows, or one sample at a time, and the same as faster-whisper's whole-file VAD
on the same audio (``tests/test_vad.py`` asserts exact equality; onnxruntime runs each window
through the same single-threaded kernels whatever the batch size). That lets every session keep
its own few hundred bytes of state while all sessions share one ONNX session.
"""

from __future__ import annotations

import os

import numpy as np

#: Silero's fixed window at 16 kHz (32 ms).
WINDOW = 512
_CONTEXT = 64
_STATE_SHAPE = (1, 1, 128)


class SileroModel:
    """The ONNX network, loaded once per process and shared by every session.

    onnxruntime sessions are safe to run from several threads at once; one intra-op thread each
    because a 32 ms window is far too small to split.
    """

    def __init__(self, path: str | None = None) -> None:
        import onnxruntime
        from faster_whisper.utils import get_assets_path

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            path or os.path.join(get_assets_path(), "silero_vad_v6.onnx"),
            providers=["CPUExecutionProvider"],
            sess_options=opts,
        )

    def run(
        self, windows: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs, h, c = self._session.run(None, {"input": windows, "h": h, "c": c})
        return probs.reshape(-1), h, c


class VadStream:
    """One session's VAD state: feed 16 kHz float samples, get whole windows with their speech
    probability. Samples that do not fill a window wait for the next call."""

    def __init__(self, model: SileroModel) -> None:
        self._model = model
        self._h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(windows, probs)``: shape ``(n, 512)`` and ``(n,)``; ``n`` may be 0."""
        buf = np.concatenate([self._pending, samples]) if self._pending.size else samples
        n = buf.size // WINDOW
        self._pending = buf[n * WINDOW :].copy()
        windows = np.ascontiguousarray(buf[: n * WINDOW], dtype=np.float32).reshape(n, WINDOW)
        if n == 0:
            return windows, np.zeros(0, dtype=np.float32)
        contexts = np.empty((n, _CONTEXT), dtype=np.float32)
        contexts[0] = self._context
        contexts[1:] = windows[:-1, -_CONTEXT:]
        self._context = windows[-1, -_CONTEXT:].copy()
        probs, self._h, self._c = self._model.run(
            np.concatenate([contexts, windows], axis=1), self._h, self._c
        )
        return windows, probs

    def take_pending(self) -> np.ndarray:
        """The samples short of a whole window (at flush, so the tail of speech is not lost)."""
        pending, self._pending = self._pending, np.zeros(0, dtype=np.float32)
        return pending
