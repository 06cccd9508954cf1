"""Reading the servers' ``/metrics`` during a load test: what they counted, and their memory.

The parsing and the figures are sans-IO (text in, numbers out); :func:`fetch_metrics` is the
one coroutine, a plain HTTP/1.1 GET spoken with h11 over a trio stream.

Memory is read from ``process_resident_memory_bytes`` (prometheus-client's process collector,
on Linux) and ``stt_gpu_memory_used_bytes`` (per GPU, summed); a server that does not export one
of them gets ``null`` figures and a note, never a guess.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Iterable
from typing import Any

import attrs
import h11
import trio
from prometheus_client.parser import text_string_to_metric_families


@attrs.define(eq=False)
class ServerSample:
    """One scrape of one instance's ``/metrics``."""

    at: float  # seconds since the run started
    url: str
    values: dict[str, float]  # flattened: name or name{label="value"} -> value


#: The samples kept from each scrape (a scrape every few seconds for hours must stay small).
KEPT = (
    "process_resident_memory_bytes",
    "stt_gpu_memory_used_bytes",
    "stt_gpu_memory_total_bytes",
    "stt_sessions_active",
    "stt_draining",
    "stt_sessions_accepted_total",
    "stt_sessions_refused_total",
    "stt_utterances_finalized_total",
    "stt_errors_total",
    "stt_audio_received_seconds_total",
    "stt_final_latency_seconds_sum",
    "stt_final_latency_seconds_count",
)

RESIDENT = "process_resident_memory_bytes"
GPU_USED = "stt_gpu_memory_used_bytes"
MiB = 1024 * 1024

#: The largest /metrics body read (a server with many GPUs and labels stays far below).
MAX_BODY = 4 * MiB


class ScrapeError(Exception):
    pass


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{"name": v, 'name{label="x"}': v}`` for the names in :data:`KEPT`;
    label sets are summed away except the one label that matters per name (reason, code)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in KEPT:
                continue
            key = sample.name
            for label in ("reason", "code"):
                if label in sample.labels:
                    key = f'{sample.name}{{{label}="{sample.labels[label]}"}}'
            out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def labelled(values: dict[str, float], name: str) -> dict[str, float]:
    """``{label value: value}`` of the samples of ``name`` kept with a label."""
    prefix = name + "{"
    return {k.split('"')[1]: v for k, v in values.items() if k.startswith(prefix)}


def _delta(first: dict[str, float], last: dict[str, float], name: str) -> float:
    return last.get(name, 0.0) - first.get(name, 0.0)


def _delta_labelled(first: dict[str, float], last: dict[str, float], name: str) -> dict[str, int]:
    a, b = labelled(first, name), labelled(last, name)
    out = {k: round(b.get(k, 0.0) - a.get(k, 0.0)) for k in sorted(set(a) | set(b))}
    return {k: v for k, v in out.items() if v}


def _by_url(samples: Iterable[ServerSample]) -> dict[str, list[ServerSample]]:
    out: dict[str, list[ServerSample]] = {}
    for s in samples:
        out.setdefault(s.url, []).append(s)
    return out


def server_report(samples: list[ServerSample]) -> dict[str, Any]:
    """What each instance counted between the first and the last scrape, and the sum."""
    instances: dict[str, Any] = {}
    for url, series in _by_url(samples).items():
        first, last = series[0].values, series[-1].values
        count = _delta(first, last, "stt_final_latency_seconds_count")
        total = _delta(first, last, "stt_final_latency_seconds_sum")
        instances[url] = {
            "scrapes": len(series),
            "sessions_accepted": round(_delta(first, last, "stt_sessions_accepted_total")),
            "sessions_refused": _delta_labelled(first, last, "stt_sessions_refused_total"),
            "utterances_finalized": round(_delta(first, last, "stt_utterances_finalized_total")),
            "errors": _delta_labelled(first, last, "stt_errors_total"),
            "audio_received_s": round(_delta(first, last, "stt_audio_received_seconds_total"), 1),
            "final_latency_mean_s": round(total / count, 3) if count else None,
            "sessions_active_max": max(
                (s.values.get("stt_sessions_active", 0.0) for s in series), default=0
            ),
        }
    summed: dict[str, Any] = {"instances": instances}
    for key in ("sessions_accepted", "utterances_finalized"):
        summed[key] = sum(i[key] for i in instances.values())
    for key in ("sessions_refused", "errors"):
        merged: dict[str, int] = {}
        for i in instances.values():
            for k, v in i[key].items():
                merged[k] = merged.get(k, 0) + v
        summed[key] = dict(sorted(merged.items()))
    return summed


def _memory_series(series: list[ServerSample], name: str) -> list[tuple[float, float]]:
    out = []
    for s in series:
        values = [v for k, v in s.values.items() if k == name or k.startswith(name + "{")]
        if values:
            out.append((s.at, sum(values) / MiB))
    return out


#: Memory readings swing with the allocator and with what is being decoded: "after warm-up"
#: and "end" are medians over this many seconds, not single readings.
MEMORY_WINDOW = 60.0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _figures(points: list[tuple[float, float]], warmup: float) -> dict[str, Any]:
    if not points:
        return {}
    last = points[-1][0]
    after = [v for t, v in points if warmup <= t < warmup + MEMORY_WINDOW] or [points[-1][1]]
    end = [v for t, v in points if t >= last - MEMORY_WINDOW]
    after_mb, end_mb = _median(after), _median(end)
    return {
        "start_mb": round(points[0][1], 1),
        "after_warmup_mb": round(after_mb, 1),
        "end_mb": round(end_mb, 1),
        "max_mb": round(max(v for _, v in points), 1),
        "growth_after_warmup_pct": (
            round((end_mb - after_mb) / after_mb * 100, 2) if after_mb else None
        ),
        "window_s": MEMORY_WINDOW,
    }


def memory_report(samples: list[ServerSample], warmup: float) -> dict[str, Any]:
    """Resident (and GPU) memory per instance: the first reading, the median of the first
    :data:`MEMORY_WINDOW` seconds after ``warmup`` and of the last ones, the most, and the growth
    from the one median to the other."""
    instances: dict[str, Any] = {}
    growth: list[float] = []
    for url, series in _by_url(samples).items():
        resident = _figures(_memory_series(series, RESIDENT), warmup)
        gpu = _figures(_memory_series(series, GPU_USED), warmup)
        entry: dict[str, Any] = {"resident": resident or None, "gpu_used": gpu or None}
        if not resident:
            entry["note"] = f"{RESIDENT} is not exported by this server's /metrics"
        instances[url] = entry
        for figures in (resident, gpu):
            if figures.get("growth_after_warmup_pct") is not None:
                growth.append(figures["growth_after_warmup_pct"])
    return {
        "warmup_s": warmup,
        "instances": instances,
        "max_growth_after_warmup_pct": max(growth) if growth else None,
    }


def memory_series(samples: list[ServerSample]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{url: {"resident": [(t, MiB)], "gpu_used": [(t, MiB)]}}`` for the plot."""
    return {
        url: {
            "resident": _memory_series(series, RESIDENT),
            "gpu_used": _memory_series(series, GPU_USED),
        }
        for url, series in _by_url(samples).items()
    }


async def fetch_metrics(url: str, *, ssl_context: ssl.SSLContext | None = None) -> str:
    """GET ``url`` (http:// or https://) and return the body; raises :class:`ScrapeError`.
    Callers bound it with ``trio.fail_after``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ScrapeError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
        if parts.scheme == "https":
            stream = trio.SSLStream(
                stream,
                ssl_context or ssl.create_default_context(),
                server_hostname=parts.hostname,
                https_compatible=True,
            )
        async with stream:
            return await _get(stream, parts.netloc, target)
    except (OSError, trio.BrokenResourceError, h11.ProtocolError, ssl.SSLError) as exc:
        raise ScrapeError(f"{url}: {exc}") from None


async def _get(stream: trio.abc.Stream, host: str, target: str) -> str:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET", target=target, headers=[("Host", host), ("Connection", "close")]
    )
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, body = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise ScrapeError(f"body larger than {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if status != 200:
        raise ScrapeError(f"HTTP {status}")
    return body.decode("utf-8", "replace")


async def scrape(url: str, at: float, *, ssl_context: ssl.SSLContext | None = None) -> ServerSample:
    return ServerSample(at, url, parse_metrics(await fetch_metrics(url, ssl_context=ssl_context)))
