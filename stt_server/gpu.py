"""GPU readings: NVML through ``pynvml`` (the ``nvidia-ml-py`` package), or simulated devices.

A :class:`GpuSource` is a blocking ``read()`` returning one :class:`GpuReading` per device; the
:class:`GpuMonitor` calls it on a worker thread every ``check_interval`` seconds and on demand at
admission, so NVML never blocks the event loop. A device whose query fails is reported as
unhealthy rather than raising: one lost GPU must not take the server down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

log = logging.getLogger(__name__)

_MiB = 1024 * 1024


@attrs.frozen
class GpuReading:
    index: int
    name: str
    total_mb: float
    used_mb: float
    utilization: float | None = None  # percent, when the device reports it
    healthy: bool = True
    error: str | None = None

    @property
    def free_mb(self) -> float:
        return max(0.0, self.total_mb - self.used_mb)

    @property
    def used_percent(self) -> float:
        return 100.0 * self.used_mb / self.total_mb if self.total_mb else 100.0


class GpuSource(Protocol):
    #: Whether the devices run real CUDA inference (False: simulated, inference on the CPU).
    real: bool

    def read(self) -> list[GpuReading]: ...


class NvmlUnavailable(Exception):
    """NVML cannot be used here (no driver, no library, no device)."""


class NvmlSource:
    """Real GPUs through NVML. ``open()`` raises :class:`NvmlUnavailable` when there are none."""

    real = True

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        self._count = 0

    @classmethod
    def open(cls) -> NvmlSource:
        source = cls()
        nvml = source._nvml
        try:
            nvml.nvmlInit()
            source._count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise NvmlUnavailable(str(exc)) from None
        if source._count == 0:
            nvml.nvmlShutdown()
            raise NvmlUnavailable("NVML reports no GPU")
        return source

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        readings = []
        for index in range(self._count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                try:
                    utilization = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nvml.NVMLError:
                    utilization = None  # some devices (MIG slices) do not report it
            except nvml.NVMLError as exc:
                readings.append(
                    GpuReading(index, f"gpu{index}", 0.0, 0.0, healthy=False, error=str(exc))
                )
                continue
            readings.append(
                GpuReading(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_mb=memory.total / _MiB,
                    used_mb=memory.used / _MiB,
                    utilization=utilization,
                )
            )
        return readings

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


class SimulatedSource:
    """Devices described as ``TOTAL:USED[,TOTAL:USED...]`` in MB, e.g. ``24576:2000,24576:20000``.

    A testing and capacity-planning aid: readings change only when told (``set_used``,
    ``set_healthy``), and inference runs on the CPU.
    """

    real = False

    def __init__(self, devices: list[tuple[float, float]]) -> None:
        self._lock = threading.Lock()  # read() runs on a worker thread
        self._devices = [[total, used, True] for total, used in devices]

    @classmethod
    def parse(cls, spec: str) -> SimulatedSource:
        devices = []
        for part in spec.split(","):
            try:
                total, used = (float(x) for x in part.strip().split(":"))
            except ValueError:
                raise ValueError(
                    f"bad simulated GPU {part.strip()!r}: expected TOTAL_MB:USED_MB"
                ) from None
            if total <= 0 or not 0 <= used <= total:
                raise ValueError(f"bad simulated GPU {part.strip()!r}: need 0 <= used <= total")
            devices.append((total, used))
        return cls(devices)

    def __len__(self) -> int:
        return len(self._devices)

    def set_used(self, index: int, used_mb: float) -> None:
        with self._lock:
            self._devices[index][1] = used_mb

    def set_healthy(self, index: int, healthy: bool) -> None:
        with self._lock:
            self._devices[index][2] = healthy

    def read(self) -> list[GpuReading]:
        with self._lock:
            return [
                GpuReading(
                    i,
                    f"simulated-{i}",
                    total,
                    used,
                    utilization=None,
                    healthy=healthy,
                    error=None if healthy else "simulated failure",
                )
                for i, (total, used, healthy) in enumerate(self._devices)
            ]


class GpuMonitor:
    """Latest readings of every device, refreshed on a thread every ``interval`` seconds."""

    def __init__(self, source: GpuSource, *, interval: float, read_timeout: float = 5.0) -> None:
        self.source = source
        self._interval = interval
        self._read_timeout = read_timeout
        #: Told every new set of readings (the device pool trips breakers from it).
        self.on_reading: Callable[[list[GpuReading]], None] = lambda readings: None
        self.readings: list[GpuReading] = []

    async def refresh(self) -> list[GpuReading]:
        """Read now. A read that hangs past ``read_timeout`` marks every device unhealthy."""
        with trio.move_on_after(self._read_timeout):
            # abandon_on_cancel: a hung NVML call cannot be interrupted, only left behind.
            readings = await trio.to_thread.run_sync(self.source.read, abandon_on_cancel=True)
            self._publish(readings)
            return self.readings
        log.error("GPU query did not answer within %.0f s", self._read_timeout)
        self._publish(
            [attrs.evolve(r, healthy=False, error="query timed out") for r in self.readings]
        )
        return self.readings

    def _publish(self, readings: list[GpuReading]) -> None:
        self.readings = readings
        self.on_reading(readings)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.refresh()
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            await self.refresh()
