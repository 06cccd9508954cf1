"""Capacity arithmetic and placement, without sockets or threads."""

import pytest

from stt_server.admission import (
    AdmissionSettings,
    Candidate,
    RefusalReason,
    capacity,
    headroom_mb,
    place,
)
from stt_server.gpu import GpuReading, SimulatedSource

SEED = AdmissionSettings(memory_threshold=85.0, memory_per_user=500.0, reserve_memory=1000.0)


def gpu(index: int, total: float, used: float, **kw) -> GpuReading:
    return GpuReading(index, f"gpu{index}", total, used, **kw)


def admit_until_refused(readings: list[GpuReading]) -> tuple[list[int], object]:
    sessions = {r.index: 0 for r in readings}
    placed = []
    while True:
        decision = place([Candidate(r, sessions[r.index], True) for r in readings], SEED)
        if decision.index is None:
            return placed, decision
        sessions[decision.index] += 1
        placed.append(decision.index)


def test_3000_mb_gpu_takes_exactly_four_sessions() -> None:
    placed, refusal = admit_until_refused([gpu(0, 3000, 0)])
    assert placed == [0, 0, 0, 0]
    assert refusal.refusal is RefusalReason.NO_GPU_HEADROOM
    assert "GPU 0" in refusal.message and "2000 MB" in refusal.message
    assert capacity(gpu(0, 3000, 0), SEED) == 4


@pytest.mark.parametrize(
    ("total", "used", "expected"),
    [
        (3000, 0, 4),  # the reserve binds: 3000 - 1000 = 2000 MB = 4 x 500
        (3000, 1, 3),  # one MB more and the 4th no longer fits
        (10000, 0, 17),  # the threshold binds: 85% of 10000 = 8500 MB = 17 x 500
        (10000, 8000, 1),
        (10000, 8001, 0),
        (24576, 20000, 1),  # 81.4% used; 85% = 20890 MB leaves room for exactly one
        (24576, 21000, 0),  # past 85% already
    ],
)
def test_capacity_boundaries(total, used, expected) -> None:
    placed, _ = admit_until_refused([gpu(0, total, used)])
    assert len(placed) == expected


def test_sessions_go_to_the_gpu_with_most_headroom() -> None:
    readings = [gpu(0, 24576, 2000), gpu(1, 24576, 20000), gpu(2, 24576, 8000)]
    placed, _ = admit_until_refused(readings)
    # Headroom under 85% of 24576 MB: GPU 0 18890 MB, GPU 2 12890 MB, GPU 1 890 MB. GPU 0 takes
    # every session until it is level with GPU 2, then the two alternate; GPU 1's single slot is
    # used only once both have sunk to its level.
    assert placed[:12] == [0] * 12
    assert set(placed[12:20]) == {0, 2}
    assert placed.index(1) >= 55
    for reading in readings:
        assert placed.count(reading.index) == capacity(reading, SEED)


def test_ties_go_to_the_lower_index() -> None:
    decision = place(
        [Candidate(gpu(1, 8000, 0), 0, True), Candidate(gpu(0, 8000, 0), 0, True)], SEED
    )
    assert decision.index == 0


def test_open_breakers_and_unhealthy_gpus_take_nobody() -> None:
    readings = [gpu(0, 24576, 0), gpu(1, 24576, 0, healthy=False, error="GPU is lost")]
    decision = place([Candidate(readings[0], 0, False), Candidate(readings[1], 0, True)], SEED)
    assert decision.index is None
    assert decision.refusal is RefusalReason.GPUS_UNAVAILABLE
    assert "circuit breaker open" in decision.message and "not answering" in decision.message
    decision = place([Candidate(readings[0], 0, True), Candidate(readings[1], 0, True)], SEED)
    assert decision.index == 0


def test_headroom_counts_placed_sessions() -> None:
    assert headroom_mb(gpu(0, 3000, 0), 0, SEED) == 2000
    assert headroom_mb(gpu(0, 3000, 0), 4, SEED) == 0
    assert headroom_mb(gpu(0, 3000, 0), 5, SEED) == -500


def test_simulated_spec_parsing_and_errors() -> None:
    source = SimulatedSource.parse("24576:2000, 24576:20000")
    readings = source.read()
    assert [(r.index, r.total_mb, r.used_mb) for r in readings] == [
        (0, 24576, 2000),
        (1, 24576, 20000),
    ]
    assert readings[1].used_percent == pytest.approx(81.4, abs=0.1)
    source.set_used(0, 3000)
    source.set_healthy(1, False)
    readings = source.read()
    assert readings[0].used_mb == 3000 and not readings[1].healthy
    for bad in ("24576", "x:1", "100:200", "0:0", "-5:0"):
        with pytest.raises(ValueError, match="bad simulated GPU"):
            SimulatedSource.parse(bad)
