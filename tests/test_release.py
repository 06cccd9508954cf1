"""A release you can check: the wheel and sdist build, twine accepts them, and the server runs
from the wheel installed into a fresh virtual environment, far from the checkout.

The fresh environment gets the wheel itself (``pip install --no-deps``) and borrows the already
installed third-party packages through a ``.pth`` line, so the test needs no network; the
checkout's own editable install is not visible there (``.pth`` files in a borrowed folder are
not processed), which the test checks, so everything the server serves must come from the
wheel's package data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import trio

import stt_server
from stt_server.loadtest.client import stream_audio
from stt_server.loadtest.local import free_port

from . import hostile

ROOT = Path(__file__).resolve().parents[1]

#: The fresh environment's processes see neither the checkout nor a PYTHONPATH pointing at it.
FRESH_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def test_the_wheel_and_sdist_carry_what_a_server_needs_and_pass_twine(dist: Path) -> None:
    version = stt_server.__version__
    wheel = dist / f"stt_server-{version}-py3-none-any.whl"
    sdist = dist / f"stt_server-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "admin_tui/admin.tcss",
        "stt_server/loadtest/clips/jfk.wav",
        "stt_server/loadtest/clips/manifest.tsv",
        "stt_server/loadtest/clips/SOURCES.md",
        f"stt_server-{version}.dist-info/licenses/LICENSE",
    ):
        assert needed in names, needed
    assert not any(n.startswith("tests/") for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"stt_server-{version}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    assert "Provides-Extra: gpu" in metadata and "Project-URL: Source" in metadata
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"LICENSE", "README.md", "pyproject.toml"} <= members


@pytest.fixture(scope="module")
def fresh_env(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with the wheel installed, and the test environment's third-party
    packages borrowed through a ``.pth`` line (not its ``.pth`` files: the editable install)."""
    env_dir = tmp_path_factory.mktemp("fresh")
    venv.EnvBuilder(with_pip=True).create(env_dir)  # ensurepip: offline, bundled
    python = str(env_dir / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=FRESH_ENV,
    ).stdout.strip()
    (Path(site) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(dist.glob("stt_server-*.whl"))
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True,
        timeout=120,
        env=FRESH_ENV,
    )
    return env_dir


def test_the_fresh_environment_imports_the_wheel_not_the_checkout(fresh_env, tmp_path) -> None:
    code = (
        "import stt_server, admin_tui, sysconfig; from stt_server.loadtest.clips import CLIPS_DIR;"
        "print(sysconfig.get_paths()['purelib']); print(stt_server.__file__);"
        "print(admin_tui.__file__); print(CLIPS_DIR)"
    )
    site, *paths = subprocess.run(
        [str(fresh_env / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=FRESH_ENV,
    ).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in paths), (site, paths)
    assert (Path(paths[1]).parent / "admin.tcss").is_file()


async def test_the_server_runs_from_the_wheel_in_a_fresh_environment(
    fresh_env: Path, tmp_path: Path, clip
) -> None:
    port = free_port()
    command = [str(fresh_env / "bin" / "stt-server"), "--host", "127.0.0.1", "--port", str(port)]
    server = await trio.lowlevel.open_process(
        [*command, "--control-socket", "", "--log-level", "warning"],
        cwd=tmp_path,
        env=FRESH_ENV,
    )
    try:
        with trio.fail_after(120):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    await stream.aclose()
                    break
                except OSError:
                    assert server.poll() is None, "the installed server exited"
                    await trio.sleep(0.2)
            result = await stream_audio(f"ws://127.0.0.1:{port}/", clip("ldc93s1.wav"))
            page = await hostile.exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert "greasy wash" in result.text.lower(), result.text
        # The browser page comes from the wheel's package data.
        assert page.startswith(b"HTTP/1.1 200 ") and b"<html" in page.lower()
        assert result.close_code == 1000
    finally:
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            assert await server.wait() == 0
