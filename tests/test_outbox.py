import pytest
import trio
import trio.testing

from stt_server.outbox import Outbox, OutboxOverflow


async def drain(box: Outbox) -> list[str]:
    out = []
    while (m := await box.get()) is not None:
        out.append(m)
    return out


async def test_partials_coalesce_and_finals_are_never_dropped() -> None:
    box = Outbox(max_pending=10, max_bytes=1 << 20)
    box.put_partial("p1a", 1)
    box.put_partial("p1b", 1)
    box.put_final("f1", 1)  # makes every partial of utterance 1 stale
    box.put_partial("p2a", 2)
    box.put_partial("p2b", 2)
    box.put("error")
    box.close()
    assert await drain(box) == ["f1", "error"]  # close discards the pending partial


async def test_partial_waits_behind_reliable_messages() -> None:
    box = Outbox(max_pending=10, max_bytes=1 << 20)
    box.put_partial("p2", 2)
    box.put_final("f1", 1)  # an earlier utterance: partial of 2 stays
    assert await box.get() == "f1"
    assert await box.get() == "p2"


async def test_a_reader_that_never_reads_overflows_instead_of_growing() -> None:
    box = Outbox(max_pending=3, max_bytes=1 << 20)
    for i in range(3):
        box.put_final(f"f{i}", i)
    with pytest.raises(OutboxOverflow):
        box.put_final("f3", 3)
    assert box.pending == 3


async def test_get_waits_for_a_message() -> None:
    box = Outbox(max_pending=3, max_bytes=1 << 20)
    got = []

    async def reader() -> None:
        got.append(await box.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        box.put_partial("p", 1)
    assert got == ["p"]


async def test_the_outbox_is_bounded_in_bytes_as_well_as_in_messages() -> None:
    box = Outbox(max_pending=100, max_bytes=100)
    box.put("é" * 30)  # 60 bytes in UTF-8, though 30 characters
    with pytest.raises(OutboxOverflow, match="bytes"):
        box.put("x" * 41)
    assert await box.get() == "é" * 30
    box.put("x" * 100)  # what was read no longer counts
    assert box.pending == 1


async def test_a_partial_is_rendered_only_when_it_is_taken() -> None:
    box = Outbox(max_pending=10, max_bytes=1 << 20)
    rendered: list[str] = []

    def render(text: str) -> str | None:
        rendered.append(text)
        return None if text == "nothing" else text

    box.put_partial(lambda: render("replaced"), 1)
    box.put_partial(lambda: render("nothing"), 1)
    box.put("f0")
    assert await box.get() == "f0"
    assert rendered == []  # neither while reliable messages go first, nor once replaced
    got = []

    async def take() -> None:
        got.append(await box.get())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            await trio.testing.wait_all_tasks_blocked()
            assert rendered == ["nothing"] and got == []  # rendered to nothing: still waiting
            box.put_partial(lambda: render("p1"), 1)
    assert got == ["p1"] and rendered == ["nothing", "p1"]
