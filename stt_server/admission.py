"""Where a new session goes, sans-IO: readings and counts in, a decision out.

The rule (the seed's): a session fits on a GPU when the memory it already uses plus
(sessions placed there + 1) x ``memory_per_user`` neither exceeds total - ``reserve_memory`` nor
passes ``memory_threshold`` percent of total. Of the GPUs it fits on (healthy, breaker willing),
it goes to the one with the most headroom left; ties go to the lower index, so placement is
deterministic.
"""

from __future__ import annotations

import enum

import attrs

from .gpu import GpuReading


@attrs.frozen
class AdmissionSettings:
    memory_threshold: float  # percent of total
    memory_per_user: float  # MB
    reserve_memory: float  # MB


class RefusalReason(enum.StrEnum):
    """Why a client was refused; the label of the refusal counters."""

    MAX_CONNECTIONS = "max_connections"
    DRAINING = "draining"
    NO_GPU_HEADROOM = "no_gpu_headroom"
    GPUS_UNAVAILABLE = "gpus_unavailable"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    ORIGIN = "origin_not_allowed"


@attrs.frozen
class Candidate:
    """One device as admission sees it."""

    reading: GpuReading
    sessions: int
    breaker_allows: bool


@attrs.frozen
class Decision:
    index: int | None
    refusal: RefusalReason | None = None
    message: str = ""


def memory_limit_mb(reading: GpuReading, settings: AdmissionSettings) -> float:
    return min(
        reading.total_mb - settings.reserve_memory,
        reading.total_mb * settings.memory_threshold / 100.0,
    )


def headroom_mb(reading: GpuReading, sessions: int, settings: AdmissionSettings) -> float:
    """MB left under the limit once ``sessions`` are counted (negative: already over)."""
    return (
        memory_limit_mb(reading, settings) - reading.used_mb - sessions * settings.memory_per_user
    )


def capacity(reading: GpuReading, settings: AdmissionSettings) -> int:
    """How many sessions this device takes from empty, at this reading."""
    return max(0, int(headroom_mb(reading, 0, settings) // settings.memory_per_user))


def place(candidates: list[Candidate], settings: AdmissionSettings) -> Decision:
    usable = [c for c in candidates if c.reading.healthy and c.breaker_allows]
    if not usable:
        states = ", ".join(
            f"GPU {c.reading.index}: "
            + ("not answering" if not c.reading.healthy else "circuit breaker open")
            for c in candidates
        )
        return Decision(None, RefusalReason.GPUS_UNAVAILABLE, f"no GPU is available ({states})")
    fitting = [
        (headroom_mb(c.reading, c.sessions + 1, settings), c)
        for c in usable
        if headroom_mb(c.reading, c.sessions + 1, settings) >= 0
    ]
    if not fitting:
        detail = "; ".join(
            f"GPU {c.reading.index}: {c.reading.used_mb:.0f} MB used + {c.sessions + 1} x "
            f"{settings.memory_per_user:.0f} MB > {memory_limit_mb(c.reading, settings):.0f} MB"
            for c in usable
        )
        return Decision(None, RefusalReason.NO_GPU_HEADROOM, f"no GPU has room ({detail})")
    best = max(fitting, key=lambda pair: (pair[0], -pair[1].reading.index))
    return Decision(best[1].reading.index)
