"""The Kubernetes manifests in deploy/k8s, checked without a cluster.

Each test reads the files as Kubernetes would and checks one promise of the deployment guide:
the readiness probe is /health on the container's port, the termination grace covers the
preStop pause and the longest drain the mounted settings allow, GPUs are requested, the
Service is sticky by client address, the ServiceMonitor finds the Service and gives the job
the name the alert rules select, the tokens come from a Secret as --tokens-file. The settings,
Secret and probes then meet a real server started here as the pod would start it.
"""

from __future__ import annotations

import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import trio
import yaml

from stt_server.auth import new_token, tokens_file_line
from stt_server.config import Config

from .test_containers import (
    DEADLINE,
    ROOT,
    LocalServer,
    control,
    docker_run,
    entrypoint,
    get,
    load_yaml,
    local,
    longest_drain,
    probe,
    readme_block,
    stages,
)

K8S = ROOT / "deploy/k8s"
MONITORING = K8S / "monitoring"


def resources(directory: Path) -> dict[str, dict[str, Any]]:
    """The objects a kustomization lists, by kind (one object per file)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = {}
    for name in kustomization["resources"]:
        (obj,) = list(yaml.safe_load_all((directory / name).read_text()))
        objects[obj["kind"]] = obj
    return objects


def app() -> dict[str, dict[str, Any]]:
    return resources(K8S)


def pod_spec() -> dict[str, Any]:
    return app()["Deployment"]["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    (only,) = pod_spec()["containers"]
    return only


def mounted_config() -> Config:
    """The settings the pod runs with: the ConfigMap's file, which the server must accept."""
    args = container()["args"]
    path = Path(args[args.index("--config") + 1])
    mount = volume_mount_for(path)
    configmap = app()["ConfigMap"]
    assert volume(mount["name"])["configMap"]["name"] == configmap["metadata"]["name"]
    text = configmap["data"][str(path.relative_to(mount["mountPath"]))]
    return Config.from_mapping(tomllib.loads(text), source="configmap.yaml")


def volume_mount_for(path: Path) -> dict[str, Any]:
    (mount,) = [m for m in container()["volumeMounts"] if path.parent == Path(m["mountPath"])]
    return mount


def volume(name: str) -> dict[str, Any]:
    (found,) = [v for v in pod_spec()["volumes"] if v["name"] == name]
    return found


def container_port(name: str) -> int:
    (port,) = [p["containerPort"] for p in container()["ports"] if p["name"] == name]
    return port


def test_the_kustomizations_name_files_that_exist() -> None:
    assert set(app()) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    # Apart: without the Prometheus Operator's CRDs, `kubectl apply -k deploy/k8s` still works.
    assert set(resources(MONITORING)) == {"ServiceMonitor", "PrometheusRule"}


def test_readiness_is_health_on_the_servers_port() -> None:
    config = mounted_config()
    assert container_port("http") == config.port
    for kind in ("readinessProbe", "startupProbe"):
        probe_spec = container()[kind]
        assert probe_spec["httpGet"] == {"path": "/health", "port": "http"}, kind
    # A big model on a cold node: as long as the systemd unit's TimeoutStartSec=300.
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # Liveness must not be /health: a draining or full server answers 503 and is fine.
    assert "httpGet" not in container()["livenessProbe"]


def test_the_termination_grace_covers_the_prestop_pause_and_the_longest_drain() -> None:
    config = mounted_config()
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    # Only a pause while the endpoints forget the pod; SIGTERM, sent after it, drains.
    assert command[0] == "sleep" and len(command) == 2
    pause = int(command[1])
    assert 5 <= pause <= 30
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace >= pause + longest_drain(config) + 10, (grace, pause, longest_drain(config))
    # The configmap's comment and the Deployment's arithmetic use these values.
    settings = (config.shutdown_grace, config.inference_timeout, config.send_timeout)
    assert (settings, pause, grace) == ((10, 60, 30), 10, 130), "update deployment.yaml's sum"


def test_gpus_are_requested_one_per_pod() -> None:
    resources_ = container()["resources"]
    assert resources_["limits"]["nvidia.com/gpu"] == 1
    # An extended resource's request, when given, must equal its limit.
    assert resources_["requests"]["nvidia.com/gpu"] == 1
    assert container()["image"].endswith(":cuda")
    # No surge: an extra pod would need a spare GPU.
    update = app()["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert (update["maxSurge"], update["maxUnavailable"]) == (0, 1)


def test_the_service_is_sticky_by_client_address_and_selects_the_pods() -> None:
    service = app()["Service"]
    labels = app()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == container_port("http")
    budget = app()["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()


def test_the_servicemonitor_scrapes_the_service_under_the_job_the_alerts_select() -> None:
    service = app()["Service"]
    monitor = resources(MONITORING)["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The operator names the job after the Service, or after its jobLabel label.
    job = (
        service["metadata"]["labels"][monitor["jobLabel"]]
        if "jobLabel" in monitor
        else (service["metadata"]["name"])
    )
    assert f'up{{job="{job}"}}' in (ROOT / "deploy/prometheus/alerts.yml").read_text()


def test_the_prometheusrule_carries_the_alert_rules_unchanged() -> None:
    rule = resources(MONITORING)["PrometheusRule"]
    assert rule["spec"] == load_yaml("deploy/prometheus/alerts.yml")


def test_the_tokens_come_from_a_secret_as_tokens_file() -> None:
    args = container()["args"]
    path = Path(args[args.index("--tokens-file") + 1])
    mount = volume_mount_for(path)
    assert mount["readOnly"]
    secret = volume(mount["name"])["secret"]
    (item,) = secret["items"]
    assert item == {"key": "tokens", "path": path.name}
    # Readable by the server through its group, by nobody else.
    security = pod_spec()["securityContext"]
    assert secret["defaultMode"] == 0o440 and security["fsGroup"] == security["runAsGroup"]
    assert not mounted_config().tokens_file  # one place says where: the flag


def test_the_pod_runs_as_the_images_user_with_its_control_socket_directory() -> None:
    security = pod_spec()["securityContext"]
    uid = int(next(a for k, a in stages("Dockerfile.cuda")[-1] if k == "USER").split(":")[0])
    assert security["runAsNonRoot"] and security["runAsUser"] == uid
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    hardening = container()["securityContext"]
    assert hardening["allowPrivilegeEscalation"] is False
    assert hardening["capabilities"] == {"drop": ["ALL"]}
    # The socket goes in the image's /run/stt-server, the user's own. Any volume there or
    # above would be world-writable (emptyDir: 0777) and the server would refuse to start.
    socket_dir = Path(mounted_config().control_socket).parent
    assert socket_dir == Path("/run/stt-server")
    for mount in container()["volumeMounts"]:
        assert not socket_dir.is_relative_to(mount["mountPath"]), mount
    assert hardening["readOnlyRootFilesystem"] is False


async def test_the_pod_settings_secret_and_probes_against_a_live_server(
    tmp_path: Path, free_port: int
) -> None:
    # The ConfigMap's file and a tokens file (what the Secret holds), where the pod mounts them.
    config_mount = volume_mount_for(Path("/etc/stt-server/config.toml"))
    tokens_path = Path(container()["args"][container()["args"].index("--tokens-file") + 1])
    files = {config_mount["mountPath"]: tmp_path / "config", str(tokens_path.parent): tmp_path}
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.toml").write_text(app()["ConfigMap"]["data"]["config.toml"])
    (tmp_path / tokens_path.name).write_text(tokens_file_line(new_token(), "k8s") + "\n")

    args = []
    for arg in container()["args"]:
        for target, source in files.items():
            if arg.startswith(target + "/"):
                arg = str(source / arg.removeprefix(target + "/"))
        args.append(arg)
    argv = local(entrypoint("Dockerfile.cuda") + args, free_port)
    liveness = local(container()["livenessProbe"]["exec"]["command"], free_port)
    readiness = container()["readinessProbe"]["httpGet"]["path"]

    with trio.fail_after(DEADLINE):
        async with LocalServer(argv, free_port, tmp_path) as live:
            assert (await get(free_port, readiness))[0] == 200
            assert await probe(liveness) == 0
            # Draining: out of the endpoints, but alive (a restart would cut the sessions short).
            assert (await control(live.control, {"cmd": "drain"}))["ok"]
            assert (await get(free_port, readiness))[0] == 503
            assert await probe(liveness) == 0
            grace = pod_spec()["terminationGracePeriodSeconds"]
            pause = int(container()["lifecycle"]["preStop"]["exec"]["command"][1])
            assert await live.stop(grace - pause) == 0
    assert await probe(liveness) == 1


def test_the_readme_kubernetes_example_matches_the_manifests(tmp_path: Path) -> None:
    deployment = app()["Deployment"]
    for line in readme_block("Kubernetes"):
        words = shlex.split(line, comments=True)
        if words[:2] == ["docker", "build"]:
            assert (ROOT / words[words.index("-f") + 1]).is_file()
            assert words[words.index("-t") + 1] == container()["image"]
        elif words[:2] == ["docker", "run"]:
            # Runs here as the image would: the tokens file the Secret is made from.
            command, _, pipeline = line.partition(" | ")
            _, argv = docker_run(shlex.split(command), tmp_path)
            script = shlex.join(local(argv, 0)) + (f" | {pipeline}" if pipeline else "")
            done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True)
            assert done.returncode == 0, done.stderr
        elif words[:4] == ["kubectl", "create", "secret", "generic"]:
            (name,) = [w for w in words[4:] if not w.startswith("-")]
            (source,) = [w.split("=", 1)[1] for w in words if w.startswith("--from-file=")]
            key, _, path = source.partition("=")
            secret = volume(volume_mount_for(Path("/run/secrets/stt-server/tokens"))["name"])
            assert (name, key) == (
                secret["secret"]["secretName"],
                secret["secret"]["items"][0]["key"],
            )
            assert (tmp_path / path).read_text().startswith("sha256:")
        elif words[:3] == ["kubectl", "apply", "-k"]:
            assert (ROOT / words[3] / "kustomization.yaml").is_file()
        elif words[:3] == ["kubectl", "rollout", "status"]:
            assert words[3] == f"deployment/{deployment['metadata']['name']}"
        elif words[:2] == ["kubectl", "port-forward"]:
            service = app()["Service"]
            assert words[2] == f"service/{service['metadata']['name']}"
            assert words[3] == f"{service['spec']['ports'][0]['port']}:8012"
        elif words[:2] == ["kubectl", "exec"]:
            assert words[-1] == "stt-admin"
        elif words[0] == "curl":
            assert "localhost:8012/health" in line
        else:
            raise AssertionError(f"the test does not know this line: {line}")
