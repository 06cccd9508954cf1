"""The project as a stranger meets it: declared dependencies, one-way imports, the CUDA wheels.

The import checks read the source (``ast``), so they see imports inside functions and under
``TYPE_CHECKING`` too: a loop there is still a loop in the design.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from stt_server import cudalibs

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stt_server", "admin_tui")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> list[str]:
    """Every module named by an import statement anywhere in the file, resolved to absolute."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import x`` depends on the module x, not on the package's __init__.
            submodules = [f"{target}.{alias.name}" for alias in node.names]
            known = [m for m in submodules if m in MODULES]
            out += known or [target]
    return out


MODULES = modules()


def internal_graph() -> dict[str, set[str]]:
    return {
        name: {m for m in imports(name, path) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_imports_one_way() -> None:
    graph = internal_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_check_finds_a_loop() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_readers_of_the_server_state_never_import_the_server() -> None:
    """The control socket and /metrics read frozen snapshots through a narrow interface."""
    graph = internal_graph()
    for reader in ("stt_server.control", "stt_server.metrics", "stt_server.stats"):
        assert not graph[reader] & {"stt_server.server", "stt_server.session"}, reader
    # The sans-IO core stays free of I/O layers.
    core_modules = ("protocol", "segmenter", "breaker", "admission", "jsonlimits", "errors")
    for core in (*core_modules, "ratelimit", "config", "auth"):
        assert "trio" not in {
            m.split(".")[0] for m in imports(f"stt_server.{core}", MODULES[f"stt_server.{core}"])
        }, core


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for line in requirements:
        name = re.match(r"[A-Za-z0-9_.\-]+", line)
        assert name, line
        names.add(re.sub(r"[-_.]+", "-", name.group()).lower())
    return names


def _third_party(name: str, path: Path) -> set[str]:
    tops = {m.split(".")[0] for m in imports(name, path)}
    return {t for t in tops if t and t not in sys.stdlib_module_names and t not in PACKAGES}


def test_every_import_is_declared_and_test_tools_stay_out_of_the_runtime() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _requirement_names(project["dependencies"])
    extras = {k: _requirement_names(v) for k, v in project["optional-dependencies"].items()}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for name, path in MODULES.items():
        # The load tester's own dependencies come with the [loadtest] extra.
        allowed = runtime | (
            extras["loadtest"] if name.startswith("stt_server.loadtest") else set()
        )
        for top in _third_party(name, path):
            dists = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(top, [top])}
            if not dists & allowed:
                undeclared.append(f"{name} imports {top} ({', '.join(sorted(dists))})")
    assert not undeclared, "\n".join(undeclared)
    # What only tests, benchmarks and docs use is not forced on a server install.
    assert not runtime & {"pytest", "hypothesis", "jiwer", "selenium", "ruff", "matplotlib"}


def test_the_gpu_extra_brings_the_cuda_libraries_ctranslate2_opens() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = _requirement_names(project["optional-dependencies"]["gpu"])
    assert {"nvidia-cublas-cu12", "nvidia-cudnn-cu12"} <= gpu


def test_cuda_wheels_are_preloaded_by_path_dependencies_first(tmp_path, monkeypatch) -> None:
    """The wheels' layout (``nvidia/<name>/lib``) as a namespace package; ctypes records loads."""
    for package, names in (
        ("cublas", ["libcublas.so.12", "libcublasLt.so.12"]),
        ("cudnn", ["libcudnn.so.9", "libcudnn_ops.so.9", "libcudnn_graph.so.9"]),
    ):
        lib = tmp_path / "nvidia" / package / "lib"
        lib.mkdir(parents=True)
        for n in names:
            (lib / n).write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in [m for m in sys.modules if m == "nvidia" or m.startswith("nvidia.")]:
        monkeypatch.delitem(sys.modules, module)
    loaded: list[tuple[str, int]] = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode=0: loaded.append((path, mode)))
    cudalibs.preload_cuda_libraries.cache_clear()
    try:
        paths = cudalibs.preload_cuda_libraries()
    finally:
        cudalibs.preload_cuda_libraries.cache_clear()
    names = [Path(p).name for p, _ in loaded]
    assert names == [
        "libcublasLt.so.12",
        "libcublas.so.12",
        "libcudnn_graph.so.9",
        "libcudnn_ops.so.9",
        "libcudnn.so.9",
    ]
    assert all(mode == ctypes.RTLD_GLOBAL for _, mode in loaded)
    assert list(paths) == [p for p, _ in loaded]


def test_without_the_wheels_nothing_is_loaded(monkeypatch) -> None:
    monkeypatch.setattr(cudalibs, "_lib_dirs", lambda package: [])
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("nothing to load"))
    cudalibs.preload_cuda_libraries.cache_clear()
    try:
        assert cudalibs.preload_cuda_libraries() == ()
    finally:
        cudalibs.preload_cuda_libraries.cache_clear()
