"""The devices sessions run on: one engine each, with a breaker and readings for GPUs.

A :class:`DevicePool` is either *CPU mode* (one CPU device, admission by ``max_connections``
alone) or *GPU mode* (one device per GPU, each with its own model, ``CapacityLimiter`` and
circuit breaker, admission by VRAM headroom on fresh readings). Simulated GPUs are GPU mode with
every engine sharing the CPU model, so tests drive exactly the code real GPUs use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import attrs
import trio

from .admission import AdmissionSettings, Candidate, Decision, RefusalReason, place
from .breaker import BreakerState, BreakerStatistics, CircuitBreaker
from .config import Config
from .engine import Engine, EngineStatistics, SpeechModel
from .gpu import GpuMonitor, GpuReading, GpuSource, NvmlSource, NvmlUnavailable, SimulatedSource
from .whisper import WhisperModel, cuda_device_count

log = logging.getLogger(__name__)

#: Seconds of audio a batch of partials may hold on a CPU. The decoder batches well there, the
#: encoder does not (it costs per second of audio): seven 9 s partials in one call took 1.05 s,
#: holding a worker that a final could have had. With this bound a preview call stays near
#: 0.4 s. Measured with 12 users (three runs each, alternating): p95 final 1.35 / 1.12 / 0.77 s
#: with it and finals unbatched, 1.66 / 1.26 / 1.49 s without (docs/benchmarks.md).
CPU_MAX_BATCH_AUDIO = 24.0


def is_out_of_memory(exc: BaseException) -> bool:
    # CTranslate2 reports CUDA allocation failures as RuntimeError("... out of memory ...").
    return "out of memory" in str(exc).lower()


@attrs.define(eq=False)
class Device:
    label: str
    engine: Engine
    index: int | None = None  # GPU index; None for the CPU device
    breaker: CircuitBreaker | None = None
    sessions: set[Hashable] = attrs.Factory(set)
    #: The session last granted this device's half-open trial (it may have decided already).
    trial: Hashable | None = None


@attrs.frozen
class DeviceStatistics:
    label: str
    index: int | None
    sessions: int
    reading: GpuReading | None
    breaker: BreakerStatistics | None
    engine: EngineStatistics


class DevicePool:
    def __init__(
        self,
        devices: list[Device],
        *,
        monitor: GpuMonitor | None = None,
        settings: AdmissionSettings | None = None,
    ) -> None:
        if monitor is not None and settings is None:
            raise ValueError("GPU mode needs admission settings")
        self.devices = devices
        self.monitor = monitor
        self.settings = settings
        #: Called with (device, reason) when a device's breaker opens; the server moves sessions.
        self.on_device_lost: Callable[[Device, str], None] = lambda device, reason: None
        for device in devices:
            device.engine.on_outcome = self._outcome_handler(device)
        if monitor is not None:
            monitor.on_reading = self._check_readings

    @property
    def gpu_mode(self) -> bool:
        return self.monitor is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for device in self.devices:
                await nursery.start(device.engine.run)
            if self.monitor is not None:
                await nursery.start(self.monitor.run)
            task_status.started()

    # -- admission -------------------------------------------------------------------------
    async def admit(self, key: Hashable) -> Device | Decision:
        """Place a new session, on fresh readings in GPU mode; a :class:`Decision` refuses."""
        if self.monitor is not None:
            await self.monitor.refresh()
        return self._place(key, exclude=None)

    def relocate(self, key: Hashable, source: Device) -> Device | None:
        """Move a session off ``source`` onto another device (last readings), if one fits."""
        source.sessions.discard(key)
        found = self._place(key, exclude=source)
        return found if isinstance(found, Device) else None

    def release(self, key: Hashable, device: Device) -> None:
        device.sessions.discard(key)
        if device.trial == key:
            # A trial session that leaves before any inference proved nothing: if the breaker
            # is still waiting on it, the next session gets the trial now, not at its deadline.
            device.trial = None
            if device.breaker is not None:
                device.breaker.abandon_trial("trial session left")

    def _place(self, key: Hashable, exclude: Device | None) -> Device | Decision:
        if self.monitor is None:
            device = self.devices[0]
            if device is exclude:
                return Decision(None, RefusalReason.GPUS_UNAVAILABLE, "no other device")
            device.sessions.add(key)
            return device
        assert self.settings is not None
        by_index = {d.index: d for d in self.devices if d is not exclude}
        candidates = [
            Candidate(
                r, len(by_index[r.index].sessions), by_index[r.index].breaker.allows_new_session()
            )
            for r in self.monitor.readings
            if r.index in by_index
        ]
        decision = place(candidates, self.settings)
        if decision.index is None:
            return decision
        device = by_index[decision.index]
        if device.breaker.grant_trial():
            device.trial = key
        device.sessions.add(key)
        return device

    # -- breaker inputs ----------------------------------------------------------------------
    def _watch(self, device: Device, change: Callable[[CircuitBreaker], None]) -> None:
        """Apply ``change`` to the device's breaker; report it if that opened the breaker."""
        breaker = device.breaker
        if breaker is None:
            return
        before = breaker.state
        change(breaker)
        if breaker.state is BreakerState.OPEN and before is not BreakerState.OPEN:
            self.on_device_lost(device, breaker.history[-1].reason)

    def _outcome_handler(self, device: Device) -> Callable[[BaseException | None], None]:
        def outcome(exc: BaseException | None) -> None:
            if exc is None:
                self._watch(device, lambda b: b.record_success())
            else:
                self._watch(
                    device,
                    lambda b: b.record_failure(
                        str(exc) or type(exc).__name__, out_of_memory=is_out_of_memory(exc)
                    ),
                )

        return outcome

    def _check_readings(self, readings: list[GpuReading]) -> None:
        assert self.settings is not None
        by_index = {d.index: d for d in self.devices}
        for reading in readings:
            device = by_index.get(reading.index)
            if device is None:
                continue
            if not reading.healthy:
                self._watch(device, lambda b, r=reading: b.trip(f"not answering: {r.error}"))
            elif reading.used_percent > self.settings.memory_threshold:
                self._watch(
                    device,
                    lambda b, r=reading: b.trip(
                        f"memory {r.used_percent:.0f}% over the "
                        f"{self.settings.memory_threshold:g}% threshold"
                    ),
                )

    def any_device_available(self) -> bool:
        """Whether some device could take a session now (breaker willing, last reading healthy)."""
        if self.monitor is None:
            return True
        healthy = {r.index for r in self.monitor.readings if r.healthy}
        return any(d.index in healthy and d.breaker.allows_new_session() for d in self.devices)

    def reset_breaker(self, index: int) -> bool:
        for device in self.devices:
            if device.index == index and device.breaker is not None:
                device.breaker.reset()
                return True
        return False

    def statistics(self) -> tuple[DeviceStatistics, ...]:
        readings = {r.index: r for r in self.monitor.readings} if self.monitor else {}
        return tuple(
            DeviceStatistics(
                label=d.label,
                index=d.index,
                sessions=len(d.sessions),
                reading=readings.get(d.index),
                breaker=d.breaker.statistics() if d.breaker else None,
                engine=d.engine.statistics(),
            )
            for d in self.devices
        )


async def open_pool(
    config: Config,
    model: SpeechModel | None = None,
    *,
    nvml: Callable[[], GpuSource] = NvmlSource.open,
    cuda_devices: Callable[[], int] = cuda_device_count,
) -> DevicePool:
    """Build the devices ``config`` asks for: simulated GPUs, real GPUs (NVML), or the CPU.

    ``model`` (tests) is used for every device instead of loading one. ``nvml`` opens the GPU
    readings (raising :class:`NvmlUnavailable` where there are none) and ``cuda_devices`` counts
    CUDA devices; tests pass their own so that what they check does not depend on the host.
    """
    breaker_clock = trio.current_time

    def breaker(label: str) -> CircuitBreaker:
        return CircuitBreaker(
            label,
            failure_threshold=config.breaker_failures,
            cooldown=config.breaker_cooldown,
            clock=breaker_clock,
        )

    settings = AdmissionSettings(
        config.memory_threshold, config.memory_per_user, config.reserve_memory
    )

    async def load(device: str, index: int = 0) -> SpeechModel:
        if model is not None:
            return model
        return await trio.to_thread.run_sync(
            lambda: WhisperModel.load(config, device=device, device_index=index)
        )

    def engine(speech: SpeechModel, label: str, *, on_cpu: bool) -> Engine:
        return Engine(
            speech,
            device=label,
            workers=config.inference_workers,
            max_batch=config.max_batch,
            # On a CPU the encoder costs per request: a batch of finals is no cheaper than
            # its finals one after another, and each waits for the slowest. Only short
            # previews batch well there.
            batch_finals=not on_cpu,
            max_batch_audio=CPU_MAX_BATCH_AUDIO if on_cpu else None,
        )

    if config.simulate_gpus:
        source = SimulatedSource.parse(config.simulate_gpus)
        cpu = await load("cpu")
        log.info(
            "simulating %d GPU(s) (%s); inference runs on the CPU",
            len(source),
            config.simulate_gpus,
        )
        devices = [
            Device(f"sim:{i}", engine(cpu, f"sim:{i}", on_cpu=True), i, breaker(f"sim:{i}"))
            for i in range(len(source))
        ]
        return DevicePool(
            devices, monitor=GpuMonitor(source, interval=config.check_interval), settings=settings
        )

    wants_gpu = config.device in ("auto", "cuda")
    if wants_gpu and config.enable_gpu_monitoring:
        try:
            source = nvml()
        except NvmlUnavailable as exc:
            log.info("NVML unavailable (%s)", exc)
        else:
            readings = source.read()
            log.info(
                "GPU monitoring on %d GPU(s): %s",
                len(readings),
                ", ".join(f"{r.index}={r.name} {r.total_mb:.0f} MB" for r in readings),
            )
            devices = [
                Device(
                    f"cuda:{r.index}",
                    engine(await load("cuda", r.index), f"cuda:{r.index}", on_cpu=False),
                    r.index,
                    breaker(f"cuda:{r.index}"),
                )
                for r in readings
            ]
            return DevicePool(
                devices,
                monitor=GpuMonitor(source, interval=config.check_interval),
                settings=settings,
            )

    device = "cuda" if config.device == "cuda" or (wants_gpu and cuda_devices() > 0) else "cpu"
    if device == "cpu":
        log.info("no GPU in use: running inference on the CPU; admission by max_connections")
    else:
        log.info("GPU monitoring off: CUDA device 0 without VRAM admission")
    speech = await load(device)
    label = "cuda:0" if device == "cuda" else "cpu"
    return DevicePool(
        [
            Device(
                label,
                engine(speech, label, on_cpu=device == "cpu"),
                0 if device == "cuda" else None,
            )
        ]
    )
