"""The CUDA libraries CTranslate2 needs, from the ``[gpu]`` extra's wheels.

CTranslate2's CUDA build opens ``libcublas.so.12`` and cuDNN 9 by name when it first runs on a
GPU. NVIDIA ships both as wheels (``nvidia-cublas-cu12``, ``nvidia-cudnn-cu12``), but into the
virtualenv's ``site-packages/nvidia/*/lib``, where the dynamic loader never looks, so the usual
advice is an ``LD_LIBRARY_PATH`` set before Python starts. Loading them here first, by path and
with ``RTLD_GLOBAL``, has the same effect for this process: when CTranslate2 later asks for a
library by name, the loader finds the one already loaded. With no such wheels installed (a CUDA
toolkit on the system, or the CPU), this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: (package holding a ``lib`` folder, library file names in load order: dependencies first).
_LIBRARIES = (
    ("nvidia.cuda_runtime", ("libcudart.so.12",)),
    ("nvidia.cublas", ("libcublasLt.so.12", "libcublas.so.12")),
    (
        "nvidia.cudnn",
        (
            "libcudnn_graph.so.9",
            "libcudnn_engines_precompiled.so.9",
            "libcudnn_engines_runtime_compiled.so.9",
            "libcudnn_heuristic.so.9",
            "libcudnn_ops.so.9",
            "libcudnn_cnn.so.9",
            "libcudnn_adv.so.9",
            "libcudnn.so.9",
        ),
    ),
)


def _lib_dirs(package: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) / "lib" for p in spec.submodule_search_locations]


@functools.cache
def preload_cuda_libraries() -> tuple[str, ...]:
    """Load the pip-installed CUDA libraries that exist; returns the paths loaded (once per
    process). A library that is present but fails to load is logged and skipped: CTranslate2's
    own error then names what is missing."""
    loaded = []
    for package, names in _LIBRARIES:
        for folder in _lib_dirs(package):
            for name in names:
                path = folder / name
                if not path.is_file():
                    continue
                try:
                    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                except OSError as exc:
                    log.warning("cannot load %s: %s", path, exc)
                    continue
                loaded.append(str(path))
    if loaded:
        log.info("loaded %d CUDA libraries from the [gpu] extra's wheels", len(loaded))
    return tuple(loaded)
