"""Scheduling rules of the engine, with a model whose speed the test controls.

A real model cannot show ordering: these tests need to hold the worker busy while requests
queue up, so the model here blocks on a threading.Event (it still runs on the engine's worker
thread through trio.to_thread, as the real one does). The last test takes such a model through
a whole server, to check what a client sees when inference overruns ``inference_timeout``.
"""

from __future__ import annotations

import functools
import json
import threading

import attrs
import numpy as np
import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from stt_server.config import Config
from stt_server.engine import Engine, TranscribeOptions
from stt_server.server import serve

from .conftest import receive_until_closed, wait_until

FINAL = TranscribeOptions(final=True)
PARTIAL = TranscribeOptions(final=False)
UPLOAD = TranscribeOptions(final=True, upload=True)


@attrs.define
class GatedModel:
    name: str = "gated"
    gate: threading.Event = attrs.Factory(threading.Event)
    calls: list[str] = attrs.Factory(list)
    threads: set[int] = attrs.Factory(set)
    fail_with: Exception | None = None

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> str:
        self.threads.add(threading.get_ident())
        self.gate.wait(10)
        kind = "upload" if options.upload else "final" if options.final else "partial"
        label = f"{kind}:{int(audio[0])}"
        self.calls.append(label)
        if self.fail_with is not None:
            raise self.fail_with
        return label


def tagged(n: int) -> np.ndarray:
    return np.full(4, n, dtype=np.float32)


def asker(engine: Engine, results: dict[str, object], errors: dict[str, Exception] | None = None):
    """``ask(key, n, options, owner)``: request ``tagged(n)``; its result lands in ``results``
    (or, given ``errors``, the RuntimeError it raised lands there)."""

    async def ask(key: str, n: int, options: TranscribeOptions, owner: str) -> None:
        try:
            results[key] = await engine.transcribe(tagged(n), options, owner=owner)
        except RuntimeError as exc:
            if errors is None:
                raise
            errors[key] = exc

    return ask


async def test_finals_jump_the_queue_and_partials_coalesce_per_session() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=1)
    results: dict[str, object] = {}
    ask = asker(engine, results)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "blocker", 0, PARTIAL, "a")
        await trio.testing.wait_all_tasks_blocked()
        assert engine.statistics().busy == 1
        nursery.start_soon(ask, "a-partial-old", 1, PARTIAL, "a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, "b-partial", 2, PARTIAL, "b")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, "a-partial-new", 3, PARTIAL, "a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, "c-final", 4, FINAL, "c")
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics()
        assert (stats.queued_finals, stats.queued_partials) == (1, 2)
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 5)
        nursery.cancel_scope.cancel()

    assert results["a-partial-old"] is None  # superseded by session a's newer partial
    # The final came last but ran first; then partials in arrival order of their sessions.
    assert model.calls == ["partial:0", "final:4", "partial:2", "partial:3"]
    assert results["c-final"].text == "final:4"
    assert results["c-final"].queued >= 0 and results["c-final"].inference >= 0
    assert engine.statistics().partials_superseded == 1


async def test_uploads_come_after_live_requests_and_never_take_the_finals_worker() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=2)
    results: dict[str, object] = {}
    ask = asker(engine, results)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "upload-1", 1, UPLOAD, "file-1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, "upload-2", 2, UPLOAD, "file-2")
        await trio.testing.wait_all_tasks_blocked()
        # The second upload waits although a worker is free: that one is kept for finals.
        assert (engine.statistics().busy, engine.statistics().queued_uploads) == (1, 1)
        nursery.start_soon(ask, "partial", 3, PARTIAL, "a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, "final", 4, FINAL, "b")
        await trio.testing.wait_all_tasks_blocked()
        # The final runs at once beside the upload; the partial waits for the upload's slot.
        stats = engine.statistics()
        assert (stats.busy, stats.queued_partials, stats.queued_uploads) == (2, 1, 1)
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 4)
        nursery.cancel_scope.cancel()
    # Once the slot is free, the live partial goes before the waiting file.
    assert model.calls.index("partial:3") < model.calls.index("upload:2")
    assert engine.statistics().uploads_done == 2


async def test_a_cancelled_waiter_takes_its_request_out_of_the_queue() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(functools.partial(engine.transcribe, tagged(0), FINAL, owner="a"))
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.05):
            await engine.transcribe(tagged(1), FINAL, owner="b")
        assert engine.statistics().queued_finals == 0
        model.gate.set()
        await engine.transcribe(tagged(2), FINAL, owner="c")
        nursery.cancel_scope.cancel()
    assert model.calls == ["final:0", "final:2"]


async def test_model_errors_reach_the_caller_and_the_engine_keeps_serving() -> None:
    model = GatedModel(fail_with=RuntimeError("CUDA failed"))
    model.gate.set()
    engine = Engine(model, device="cpu", workers=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        with pytest.raises(RuntimeError, match="CUDA failed"):
            await engine.transcribe(tagged(1), FINAL, owner="a")
        model.fail_with = None
        result = await engine.transcribe(tagged(2), FINAL, owner="a")
        nursery.cancel_scope.cancel()
    assert result.text == "final:2"
    assert engine.statistics().failures == 1


async def test_inference_runs_on_worker_threads_up_to_the_limiter() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        for i in range(4):
            nursery.start_soon(functools.partial(engine.transcribe, tagged(i), FINAL, owner=i))
        await trio.sleep(0.2)
        stats = engine.statistics()
        assert stats.busy == 2 and stats.queued_finals == 2
        assert engine.limiter.borrowed_tokens == 2
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: engine.statistics().finals_done == 4)
        nursery.cancel_scope.cancel()
    assert threading.get_ident() not in model.threads


@attrs.define
class Stalling:
    """Answers at once, except while ``stalled``: then it holds its worker thread until
    ``release`` is set (as a wedged GPU would), and only then answers."""

    name: str = "stalling"
    stalled: bool = True
    release: threading.Event = attrs.Factory(threading.Event)

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> str:
        if self.stalled:
            self.release.wait(30)
        return "back to normal" if options.final else ""


async def next_answer(ws) -> tuple[dict, list[dict]]:
    """The next ``completed`` or ``error``, and the messages that came before it."""
    before = []
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] in ("completed", "error"):
            return message, before
        before.append(message)


async def test_a_final_past_inference_timeout_fails_that_utterance_and_the_session_goes_on(
    nursery, clip
) -> None:
    model = Stalling()
    config = Config(host="127.0.0.1", port=0, control_socket="", inference_timeout=1.0)
    server = await nursery.start(functools.partial(serve, config, model=model))
    speech = clip("ldc93s1.wav").tobytes()
    try:
        with trio.fail_after(20):
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                assert json.loads(await ws.get_message())["type"] == "session"
                await ws.send_message(speech)
                await ws.send_message('{"type":"flush"}')
                flushed = trio.current_time()
                failed, _ = await next_answer(ws)
                waited = trio.current_time() - flushed
                # The model is fast again; the stalled threads return and free their workers.
                model.stalled = False
                model.release.set()
                await ws.send_message(speech)
                await ws.send_message('{"type":"flush"}')
                recovered, _ = await next_answer(ws)
                await ws.send_message('{"type":"end"}')
                rest, code = await receive_until_closed(ws)
    finally:
        model.release.set()
    assert failed["type"] == "error" and failed["code"] == "transcription_failed"
    assert "utterance 1" in failed["message"]
    assert 1.0 <= waited < 3.0, waited  # it waited inference_timeout, no less, not much more
    assert recovered["type"] == "completed"
    assert (recovered["utterance_id"], recovered["text"]) == (2, "back to normal")
    assert code == 1000 and not [m for m in rest if m["type"] == "error"]


async def test_one_worker_stays_free_for_finals_and_partials_take_turns() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=2)
    results: dict[str, object] = {}
    ask = asker(engine, results)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        for key, n, owner in (("a1", 1, "a"), ("b1", 2, "b"), ("c1", 3, "c")):
            nursery.start_soon(ask, key, n, PARTIAL, owner)
            await trio.testing.wait_all_tasks_blocked()
        # Two workers, three partials queued: only one partial runs, one worker waits.
        stats = engine.statistics()
        assert (stats.busy, stats.queued_partials) == (1, 2)
        nursery.start_soon(ask, "final", 9, FINAL, "d")
        await trio.testing.wait_all_tasks_blocked()
        assert engine.statistics().busy == 2  # the final did not wait for a partial
        # "a" asks again while its first partial runs: it goes behind b and c.
        nursery.start_soon(ask, "a2", 4, PARTIAL, "a")
        await trio.testing.wait_all_tasks_blocked()
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 5)
        nursery.cancel_scope.cancel()
    partials = [c for c in model.calls if c.startswith("partial")]
    assert partials == ["partial:1", "partial:2", "partial:3", "partial:4"]


@attrs.define
class WarmingModel:
    name: str = "warming"
    events: list[str] = attrs.Factory(list)

    def warm_up(self) -> None:
        self.events.append("warm")

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> str:
        return ""


async def test_the_model_is_warmed_up_before_the_port_opens(nursery) -> None:
    model = WarmingModel()
    config = Config(host="127.0.0.1", port=0, control_socket="")
    server = await nursery.start(functools.partial(serve, config, model=model))
    assert model.events == ["warm"]  # before serve() reported itself started (listening)
    assert server.health()[0]


def test_the_real_model_warms_up_once(speech_model, monkeypatch) -> None:
    speech_model.warm_up()
    calls = []
    monkeypatch.setattr(type(speech_model), "transcribe", lambda self, *a: calls.append(a))
    speech_model.warm_up()
    assert calls == []  # already warm: nothing run again


async def test_speculative_finals_come_after_finals_before_partials_and_one_at_a_time() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=1)
    guess = TranscribeOptions(final=True, speculative=True)
    results: dict[str, object] = {}
    ask = asker(engine, results)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "a-guess-running", 1, guess, "a")
        await trio.testing.wait_all_tasks_blocked()
        # While a's guess runs, a's next guess is refused at once (None), not queued.
        nursery.start_soon(ask, "a-guess-refused", 2, guess, "a")
        await trio.testing.wait_all_tasks_blocked()
        assert results["a-guess-refused"] is None
        # b queues a guess, then a newer one that replaces it; c a partial; d a final.
        for key, n, options, owner in (
            ("b-guess-old", 3, guess, "b"),
            ("b-guess-new", 4, guess, "b"),
            ("c-partial", 5, PARTIAL, "c"),
            ("d-final", 6, FINAL, "d"),
        ):
            nursery.start_soon(ask, key, n, options, owner)
            await trio.testing.wait_all_tasks_blocked()
        assert results["b-guess-old"] is None
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 6)
        nursery.cancel_scope.cancel()
    # One worker, so the calls show the order: the final, then b's newer guess, then the
    # partial; neither the refused nor the replaced guess ran.
    assert model.calls == ["final:1", "final:6", "final:4", "partial:5"]


async def test_a_guess_withdrawn_leaves_the_queue_but_one_running_still_answers() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=1)
    guess = TranscribeOptions(final=True, speculative=True)
    results: dict[str, object] = {}
    ask = asker(engine, results)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "a-running", 1, guess, "a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, "b-queued", 2, guess, "b")
        await trio.testing.wait_all_tasks_blocked()
        # Both speakers went on talking: neither guess is a final any more.
        engine.withdraw_speculative("a")
        engine.withdraw_speculative("b")
        await trio.testing.wait_all_tasks_blocked()
        assert results == {"b-queued": None}  # left the queue at once, never to run
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: "a-running" in results)
        nursery.cancel_scope.cancel()
    # a's guess was already running: its caller still gets what it says.
    assert results["a-running"].text == "final:1"
    assert model.calls == ["final:1"]
    assert engine.statistics().unused_seconds == {}


async def test_a_guess_at_a_final_may_take_the_worker_kept_for_finals() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=2)
    guess = TranscribeOptions(final=True, speculative=True)
    results: dict[str, object] = {}
    ask = asker(engine, results)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "a-partial", 1, PARTIAL, "a")  # holds the one partial worker
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, "b-partial", 2, PARTIAL, "b")  # waits for it
        nursery.start_soon(ask, "c-guess", 3, guess, "c")  # does not
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics()
        assert (stats.busy, stats.queued_partials) == (2, 1)
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 3)
        nursery.cancel_scope.cancel()


async def test_a_queued_guess_whose_endpoint_came_is_promoted_to_a_final() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=1)
    guess = TranscribeOptions(final=True, speculative=True)
    results: dict[str, object] = {}
    ask = asker(engine, results)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "a-partial", 1, PARTIAL, "a")  # holds the worker
        await trio.testing.wait_all_tasks_blocked()
        for key, n, owner in (("b-guess", 2, "b"), ("c-guess", 3, "c")):
            nursery.start_soon(ask, key, n, guess, owner)
            await trio.testing.wait_all_tasks_blocked()
        engine.promote_speculative("c")  # c's endpoint is confirmed: ahead of b's guess
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 3)
        nursery.cancel_scope.cancel()
    assert model.calls == ["partial:1", "final:3", "final:2"]


@attrs.define
class BatchingModel(GatedModel):
    """A GatedModel that also takes batches; records each model call's requests."""

    batches: list[list[str]] = attrs.Factory(list)
    poison: int = -1  # a request tagged with this fails, alone

    def transcribe_batch(self, requests):
        self.gate.wait(10)
        labels = []
        results = []
        for audio, options in requests:
            kind = "final" if options.final else "partial"
            label = f"{kind}:{int(audio[0])}"
            labels.append(label)
            results.append(RuntimeError("bad request") if audio[0] == self.poison else label)
        self.batches.append(labels)
        return results


async def test_queued_requests_of_one_kind_are_decoded_together_finals_first() -> None:
    model = BatchingModel(poison=5)
    engine = Engine(model, device="cpu", workers=1, max_batch=3)
    results: dict[str, object] = {}
    errors: dict[str, Exception] = {}
    ask = asker(engine, results, errors)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "blocker", 0, PARTIAL, "z")  # a lone request: a batch of one
        await trio.testing.wait_all_tasks_blocked()
        for i, owner in enumerate("abcd"):
            nursery.start_soon(ask, f"{owner}-partial", 1 + i, PARTIAL, owner)
            await trio.testing.wait_all_tasks_blocked()
        for i, owner in enumerate("ef"):
            nursery.start_soon(ask, f"{owner}-final", 5 + i, FINAL, owner)
            await trio.testing.wait_all_tasks_blocked()
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) + len(errors) == 7)
        nursery.cancel_scope.cancel()

    # Lone requests run alone (through transcribe); both finals went in one call, never
    # mixed with partials; then the partials, at most three at a time, oldest sessions first.
    assert model.calls == ["partial:0", "partial:4"]
    assert model.batches == [["final:5", "final:6"], ["partial:1", "partial:2", "partial:3"]]
    # The failing request failed alone; its batch-mates got their answers.
    assert set(errors) == {"e-final"} and results["f-final"].text == "final:6"
    stats = engine.statistics()
    assert (stats.batches, stats.batched_requests, stats.failures) == (4, 7, 1)


async def test_finals_queued_for_idle_workers_run_side_by_side_not_in_one_batch() -> None:
    model = BatchingModel()
    engine = Engine(model, device="cpu", workers=2, max_batch=8)
    results: dict[str, object] = {}
    ask = asker(engine, results)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        # Both queued before either idle worker wakes: each worker takes its share, one.
        nursery.start_soon(ask, "a-final", 1, FINAL, "a")
        nursery.start_soon(ask, "b-final", 2, FINAL, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert engine.statistics().busy == 2
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 2)
        nursery.cancel_scope.cancel()
    assert sorted(model.calls) == ["final:1", "final:2"] and model.batches == []


async def test_unbatched_finals_and_guesses_go_one_per_call_while_partials_still_batch() -> None:
    """``batch_finals=False`` (how CPU engines are built): three queued finals and three queued
    guesses are three and three calls, in order; the partials queued beside them still go
    together."""
    model = BatchingModel()
    engine = Engine(model, device="cpu", workers=1, max_batch=8, batch_finals=False)
    guess = TranscribeOptions(final=True, speculative=True)
    results: dict[str, object] = {}
    ask = asker(engine, results)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "blocker", 0, PARTIAL, "z")
        await trio.testing.wait_all_tasks_blocked()
        for i, owner in enumerate("abc"):
            nursery.start_soon(ask, f"{owner}-partial", 1 + i, PARTIAL, owner)
            nursery.start_soon(ask, f"{owner}-guess", 4 + i, guess, owner)
            nursery.start_soon(ask, f"{owner}-final", 7 + i, FINAL, owner)
            await trio.testing.wait_all_tasks_blocked()
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 10)
        nursery.cancel_scope.cancel()
    finals, guesses = ["final:7", "final:8", "final:9"], ["final:4", "final:5", "final:6"]
    assert model.calls == ["partial:0", *finals, *guesses]
    assert model.batches == [["partial:1", "partial:2", "partial:3"]]


async def test_a_batch_of_partials_holds_no_more_audio_than_max_batch_audio() -> None:
    """Four queued 2 s partials with a 5 s bound: two calls of two. A partial longer than the
    bound still runs, alone."""
    model = BatchingModel()
    engine = Engine(model, device="cpu", workers=1, max_batch=8, max_batch_audio=5.0)
    assert engine.max_batch_audio == 5.0
    results: dict[str, object] = {}

    async def ask(owner: str, tag: int, seconds: float) -> None:
        audio = np.full(int(seconds * 16000), tag, dtype=np.float32)
        results[owner] = await engine.transcribe(audio, PARTIAL, owner=owner)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "z", 0, 1.0)
        await trio.testing.wait_all_tasks_blocked()
        for i, owner in enumerate("abcd"):
            nursery.start_soon(ask, owner, 1 + i, 2.0)
            await trio.testing.wait_all_tasks_blocked()
        for owner, tag, seconds in (("e", 5, 7.0), ("f", 6, 1.0)):
            # One at a time: tasks started together queue in no set order.
            nursery.start_soon(ask, owner, tag, seconds)
            await trio.testing.wait_all_tasks_blocked()
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 7)
        nursery.cancel_scope.cancel()
    assert model.calls == ["partial:0", "partial:5", "partial:6"]
    assert model.batches == [["partial:1", "partial:2"], ["partial:3", "partial:4"]]


async def test_a_model_without_batches_gets_one_request_at_a_time() -> None:
    model = GatedModel()
    engine = Engine(model, device="cpu", workers=1, max_batch=8)
    results: dict[str, object] = {}
    ask = asker(engine, results)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        for i in range(3):
            nursery.start_soon(ask, f"final-{i}", i, FINAL, str(i))
            await trio.testing.wait_all_tasks_blocked()
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 3)
        nursery.cancel_scope.cancel()
    assert model.calls == ["final:0", "final:1", "final:2"]
    assert engine.statistics().batches == 3


async def test_guesses_at_finals_are_never_batched_with_partials_nor_uploads_at_all() -> None:
    model = BatchingModel()
    engine = Engine(model, device="cpu", workers=1, max_batch=8)
    guess = TranscribeOptions(final=True, speculative=True)
    results: dict[str, object] = {}
    ask = asker(engine, results)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "blocker", 0, PARTIAL, "z")
        await trio.testing.wait_all_tasks_blocked()
        for key, n, options, owner in (
            ("a-partial", 1, PARTIAL, "a"),
            ("b-guess", 2, guess, "b"),
            ("c-partial", 3, PARTIAL, "c"),
            ("d-guess", 4, guess, "d"),
            ("e-upload", 5, UPLOAD, "e"),
            ("f-upload", 6, UPLOAD, "f"),
        ):
            nursery.start_soon(ask, key, n, options, owner)
            await trio.testing.wait_all_tasks_blocked()
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 7)
        nursery.cancel_scope.cancel()
    assert model.batches == [["final:2", "final:4"], ["partial:1", "partial:3"]]
    assert model.calls == ["partial:0", "upload:5", "upload:6"]  # one file chunk at a time


@attrs.define
class BrokenBatchModel(GatedModel):
    answer: str = "raise"  # or "short": one answer too few

    def transcribe_batch(self, requests):
        self.gate.wait(10)
        if self.answer == "raise":
            raise RuntimeError("device lost")
        return ["x"] * (len(requests) - 1)


@pytest.mark.parametrize("answer", ["raise", "short"])
async def test_a_failed_model_call_fails_each_request_once_and_counts_once(answer) -> None:
    model = BrokenBatchModel(answer=answer)
    engine = Engine(model, device="cpu", workers=1, max_batch=8)
    outcomes: list[object] = []
    engine.on_outcome = outcomes.append
    errors: dict[str, Exception] = {}
    ask = asker(engine, {}, errors)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "blocker", 0, FINAL, "blocker")
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            nursery.start_soon(ask, f"final-{i}", i + 1, FINAL, f"final-{i}")
            await trio.testing.wait_all_tasks_blocked()
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(errors) == 3)
        nursery.cancel_scope.cancel()
    batched = [errors[f"final-{i}"] for i in range(3)]
    # Each caller has an exception of its own, caused by the one failure.
    assert len({id(e) for e in batched}) == 3
    assert all(isinstance(e.__cause__, RuntimeError) for e in batched)
    # The breaker hears of the failed call once, not once per request in it.
    assert outcomes[0] is None and len(outcomes) == 2  # the blocker's success, the failure
    assert isinstance(outcomes[1], RuntimeError) and "blocker" not in errors


@attrs.define
class CostlyModel(BatchingModel):
    """A BatchingModel whose every call, one request or a batch, moves ``clock`` on by what
    its first request costs: by its tag where ``by_tag`` names it, else by its kind."""

    clock: list[float] = attrs.Factory(lambda: [0.0])
    costs: dict[str, float] = attrs.Factory(dict)
    by_tag: dict[int, float] = attrs.Factory(dict)

    def _spend(self, audio: np.ndarray, options: TranscribeOptions) -> None:
        kind = "upload" if options.upload else "final" if options.final else "partial"
        self.clock[0] += self.by_tag.get(int(audio[0]), self.costs[kind])

    def transcribe(self, audio, options):
        label = super().transcribe(audio, options)
        self._spend(audio, options)
        return label

    def transcribe_batch(self, requests):
        results = super().transcribe_batch(requests)
        self._spend(*requests[0])
        return results


async def test_worker_seconds_are_counted_once_per_call_by_what_it_carried() -> None:
    model = CostlyModel(costs={"final": 1.0, "partial": 0.1, "upload": 3.0}, by_tag={4: 0.7})
    engine = Engine(model, device="cpu", workers=1, max_batch=4, clock=lambda: model.clock[0])
    guess = TranscribeOptions(final=True, speculative=True)
    results: dict[str, object] = {}
    ask = asker(engine, results)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(ask, "blocker", 0, PARTIAL, "z")
        await trio.testing.wait_all_tasks_blocked()
        for key, n, options, owner in [
            ("a", 1, PARTIAL, "a"),
            ("b", 2, PARTIAL, "b"),
            ("c", 3, PARTIAL, "c"),
            ("guess", 4, guess, "d"),
            ("promoted", 5, guess, "e"),
            ("final", 6, FINAL, "f"),
            ("upload", 7, UPLOAD, "g"),
        ]:
            nursery.start_soon(ask, key, n, options, owner)
            await trio.testing.wait_all_tasks_blocked()
            if key == "promoted":
                engine.promote_speculative("e")  # its endpoint came while it was queued
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: len(results) == 8)
        nursery.cancel_scope.cancel()

    # The promoted guess (first) and the final went in one call, counted as a final; the three
    # partials in another. Each call counted once: not its requests' seconds added up.
    assert model.batches == [["final:5", "final:6"], ["partial:1", "partial:2", "partial:3"]]
    stats = engine.statistics()
    assert stats.batches == 5
    assert stats.busy_seconds == pytest.approx(
        {"partial": 0.2, "final": 1.0, "guess": 0.7, "upload": 3.0}
    )


async def test_a_call_nobody_waits_for_any_more_counts_as_work_thrown_away() -> None:
    model = CostlyModel(costs={"final": 1.0, "partial": 0.1, "upload": 3.0})
    engine = Engine(model, device="cpu", workers=1, clock=lambda: model.clock[0])
    guess = TranscribeOptions(final=True, speculative=True)
    results: dict[str, object] = {}
    ask = asker(engine, results)
    dropped = trio.CancelScope()

    async def speaker_who_resumes() -> None:
        with dropped:
            await engine.transcribe(tagged(1), guess, owner="b")

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(speaker_who_resumes)
        await trio.testing.wait_all_tasks_blocked()  # its guess runs, held at the gate
        nursery.start_soon(ask, "kept", 2, guess, "c")
        await trio.testing.wait_all_tasks_blocked()
        dropped.cancel()  # speech resumed: nobody waits for the first guess any more
        model.gate.set()
        with trio.fail_after(30):
            await wait_until(lambda: "kept" in results)
        nursery.cancel_scope.cancel()

    stats = engine.statistics()
    assert model.calls == ["final:1", "final:2"]  # both guesses ran
    assert stats.busy_seconds == pytest.approx({"guess": 2.0})
    assert stats.unused_seconds == pytest.approx({"guess": 1.0})


async def test_a_batch_is_thrown_away_only_when_none_of_its_callers_still_waits() -> None:
    async def run_batch_of_two(cancelled: set[str]) -> dict[str, float]:
        model = CostlyModel(costs={"final": 1.0, "partial": 0.1, "upload": 3.0})
        engine = Engine(model, device="cpu", workers=1, max_batch=2, clock=lambda: model.clock[0])
        scopes = {owner: trio.CancelScope() for owner in "ab"}

        async def ask(owner: str, n: int) -> None:
            with scopes[owner]:
                await engine.transcribe(tagged(n), PARTIAL, owner=owner)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "a", 1)
            nursery.start_soon(ask, "b", 2)
            await trio.testing.wait_all_tasks_blocked()  # both queued before a worker runs
            await nursery.start(engine.run)
            await trio.testing.wait_all_tasks_blocked()  # one call holds both, at the gate
            for owner in cancelled:
                scopes[owner].cancel()
            model.gate.set()
            with trio.fail_after(30):
                await wait_until(lambda: engine.statistics().batches == 1)
            nursery.cancel_scope.cancel()
        assert [sorted(b) for b in model.batches] == [["partial:1", "partial:2"]]
        return engine.statistics().unused_seconds

    assert await run_batch_of_two({"a"}) == {}  # b still read its answer
    assert await run_batch_of_two({"a", "b"}) == pytest.approx({"partial": 0.1})
