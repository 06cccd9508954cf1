"""Frozen snapshots of the server's state, shared by the server and what reads it.

The control socket and ``/metrics`` read only these values (through a ``statistics()`` callable),
never the server's objects, so they sit below the server in the import graph and cannot reach
into its internals.
"""

from __future__ import annotations

import attrs

from .devices import DeviceStatistics


@attrs.frozen
class SessionStatistics:
    session_id: str
    peer: str
    started: float
    duration: float
    audio_seconds: float
    utterances: int
    errors: int
    device: str
    last_partial_latency: float | None
    last_final_latency: float | None
    token_label: str | None = None
    #: Average seconds between two partials of one utterance (the cadence the client sees),
    #: which widens when the device is busy; None until there are two.
    partial_gap: float | None = None


@attrs.frozen
class KickedClient:
    session_id: str
    peer: str
    reason: str
    at: float  # wall-clock time


@attrs.frozen
class ServerStatistics:
    listening: tuple[tuple[str, int], ...]
    uptime: float
    draining: bool
    max_connections: int
    accepted: int
    refused: dict[str, int]
    #: Connections open that have not finished their handshake yet.
    handshaking: int
    sessions: tuple[SessionStatistics, ...]
    devices: tuple[DeviceStatistics, ...]
    kicked: tuple[KickedClient, ...]
    kicked_total: int
