"""The deployment files in deploy/ and docs/, checked as far as this machine allows: Kubernetes
manifests against the API schemas (kubernetes-validate), compose.yaml's structure, the secrets
script run for real, the Dockerfile's health check and the systemd unit (systemd-analyze)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker.cli import EXIT_CONFIG
from broker.config import ServerSettings, load_settings
from broker.crypto import load_keyring
from broker.server.callers import hash_token
from broker.server.transport import FD_RESERVE
from broker_devtools import demo as devprovider

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
VENV_BIN = Path(sys.executable).parent
SERVER_LABELS = {
    "app.kubernetes.io/name": "credential-broker",
    "app.kubernetes.io/component": "server",
}


def manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found[path.name] = yaml.safe_load(path.read_text())
    return found


# -- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(manifests()))
def test_kubernetes_manifest_is_valid_against_the_api_schema(name: str) -> None:
    kubernetes_validate.validate(manifests()[name], "1.37.0", strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == set(manifests()) - {"secret.example.yaml"}


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _secret_refs(container: dict[str, Any]) -> dict[str, str]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in container["env"]
        if "valueFrom" in e
    }


def test_deployment_two_non_root_replicas_with_grpc_probes_and_secrets(tmp_path: Path) -> None:
    deployment = manifests()["deployment.yaml"]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"] == SERVER_LABELS
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    container = _container(deployment)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe  # the health service
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BROKER_LISTEN"].endswith(":50051")
    assert env["BROKER_METRICS_LISTEN"].endswith(":9464")
    refs = _secret_refs(container)
    assert refs["BROKER_DATABASE_URL"] == "database-url"
    assert refs["BROKER_KEYS"] == "keys"
    # About 180 MiB measured by `broker bench` with 1M rows: the request must cover it.
    memory = container["resources"]["requests"]["memory"]
    assert memory.endswith("Mi")
    assert int(memory[:-2]) >= 180
    assert "180 MiB" in (K8S / "deployment.yaml").read_text()
    # The settings file the broker reads is the ConfigMap's key, and it is valid.
    assert env["BROKER_CONFIG"] == "/etc/broker/broker.toml"
    config = manifests()["configmap.yaml"]["data"]["broker.toml"]
    (tmp_path / "broker.toml").write_text(config)
    settings = load_settings(env={}, config_path=tmp_path / "broker.toml")
    assert settings.server.environment == "production"
    # The connection and request limits are spelled out, at their safe defaults or tighter.
    defaults = ServerSettings()
    assert settings.server.max_connections <= defaults.max_connections
    assert settings.server.handshake_timeout_seconds <= defaults.handshake_timeout_seconds
    assert settings.server.max_connection_idle_seconds <= defaults.max_connection_idle_seconds
    assert settings.server.max_receive_bytes <= defaults.max_receive_bytes
    for name in ("max_connections", "handshake_timeout_seconds", "max_connection_idle_seconds"):
        assert f"{name} = " in config, name


def test_migration_job_service_pdb_and_network_policy_fit_the_deployment() -> None:
    found = manifests()
    job = found["job-migrate.yaml"]
    container = _container(job)
    assert container["args"] == ["migrate"]
    assert _secret_refs(container)["BROKER_DATABASE_URL"] == "database-url"
    assert container["image"] == _container(found["deployment.yaml"])["image"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    service = found["service.yaml"]["spec"]
    assert service["selector"] == SERVER_LABELS
    assert {p["name"]: p["targetPort"] for p in service["ports"]} == {
        "grpc": "grpc",
        "metrics": "metrics",
    }
    pdb = found["pdb.yaml"]["spec"]
    assert pdb["selector"]["matchLabels"] == SERVER_LABELS
    assert pdb["minAvailable"] == 1
    policy = found["networkpolicy.yaml"]["spec"]
    selected = policy["podSelector"]["matchLabels"]
    assert selected.items() <= SERVER_LABELS.items()
    ingress_ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress_ports == {50051, 9464}
    secret = found["secret.example.yaml"]
    assert set(secret["stringData"]) >= {"database-url", "keys"}


# -- compose ------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def test_compose_has_postgres_a_one_shot_migration_two_replicas_and_the_dev_provider() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "dev-provider", "broker-1", "broker-2"}
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["dev-provider"]["command"][0] == "dev-provider"
    listens = set()
    for name in ("broker-1", "broker-2"):
        broker = services[name]
        assert broker["command"] == ["serve"]
        assert broker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        # The demo provider is plain http, which the broker accepts on loopback only.
        assert broker["network_mode"] == "service:dev-provider"
        listens.add(broker["environment"]["BROKER_LISTEN"])
    assert len(listens) == 2, "two replicas in one network namespace need two ports"
    published = {p.split(":")[-1] for p in services["dev-provider"]["ports"]}
    assert {listen.rpartition(":")[2] for listen in listens} <= published


def test_compose_takes_keys_passwords_and_tokens_from_files_only() -> None:
    data = compose()
    files = {name: spec["file"] for name, spec in data["secrets"].items()}
    assert all(path.startswith("./secrets/") for path in files.values())
    for name, service in data["services"].items():
        env = service.get("environment", {})
        assert "BROKER_KEYS" not in env, name
        assert not any("PASSWORD=" in str(v) or "cb_" in str(v) for v in env.values()), name
        for value in env.values():
            for mounted in re.findall(r"/run/secrets/(\w+)", str(value)):
                assert mounted in service["secrets"], (name, mounted)
    assert data["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"]
    assert "secrets/" in (DEPLOY / ".gitignore").read_text()


def test_init_secrets_makes_settings_the_broker_accepts(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, deploy, ignore=shutil.ignore_patterns("secrets"))
    env = {**os.environ, "BROKER": str(VENV_BIN / "broker")}
    env = {k: v for k, v in env.items() if not k.startswith("BROKER_")}
    secrets_dir = deploy / "secrets"
    made = []
    for _ in range(2):  # a second run keeps what the first made
        done = subprocess.run(
            ["sh", str(deploy / "init-secrets.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        made.append({p.name: p.read_text() for p in secrets_dir.iterdir()})
    assert made[0] == made[1]
    assert set(made[0]) == {"broker_keys", "postgres_password", "app_token", "broker.toml"}
    token = (secrets_dir / "app_token").read_text().strip()
    keys_command = compose()["x-broker"]["environment"]["BROKER_KEYS_COMMAND"]
    settings = load_settings(
        env={"BROKER_KEYS_COMMAND": keys_command.replace("/run/secrets/", f"{secrets_dir}/")},
        config_path=secrets_dir / "broker.toml",
    )
    assert settings.callers["app"].token_sha256 == hash_token(token)
    password = (secrets_dir / "postgres_password").read_text().strip()
    assert f":{password}@postgres:5432/" in settings.database.url.get_secret_value()
    assert load_keyring(settings.keys).primary_id
    # The demo provider section is the one `broker dev-provider` prints for its port.
    template = tomllib.loads((DEPLOY / "broker.compose.toml").read_text())
    fake = devprovider.start(port=0)
    try:
        printed = tomllib.loads(devprovider.provider_toml(fake))["providers"]["demo"]
        port = fake.url.rpartition(":")[2]
    finally:
        fake.stop()
    expected = {
        k: v.replace(f":{port}/", ":8765/") if isinstance(v, str) else v for k, v in printed.items()
    }
    expected["redirect_uris"] = [u.replace(f":{port}/", ":8765/") for u in printed["redirect_uris"]]
    assert template["providers"]["demo"] == expected


# -- Dockerfile and systemd ---------------------------------------------------------------------


def test_dockerfile_health_check_ports_and_volumes() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^HEALTHCHECK .*\\\n\s+CMD \["broker", "health"', text, re.MULTILINE)
    assert re.search(r"^EXPOSE 50051 9464$", text, re.MULTILINE)
    assert re.search(r'^VOLUME \["/var/lib/broker"\]$', text, re.MULTILINE)
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    for documented in ("# Ports:", "# Volumes:", "# Health:"):
        assert documented in text


def test_systemd_unit_example() -> None:
    unit = ROOT / "docs" / "credential-broker.service"
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["ExecStart"] == ["/opt/broker/bin/broker serve"]
    assert settings["ExecStartPre"] == ["/opt/broker/bin/broker migrate"]
    assert settings["User"] == ["broker"]
    assert settings["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    assert settings["NoNewPrivileges"] == ["yes"]
    # Room for server.max_connections (500) and the broker's own descriptors.
    assert int(settings["LimitNOFILE"][0]) >= ServerSettings().max_connections + FD_RESERVE
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # not on every developer's machine; CI's has it
        return
    local = unit.read_text().replace("/opt/broker/bin/broker", str(VENV_BIN / "broker"))
    copy = Path(os.environ.get("TMPDIR", "/tmp")) / f"credential-broker-{os.getpid()}.service"
    copy.write_text(local)
    try:
        done = subprocess.run(
            [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        copy.unlink()
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
