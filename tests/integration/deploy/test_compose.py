"""docker/compose.yaml: a valid Compose file that runs what the Helm chart runs.

There is no Docker engine here, so `docker compose config` cannot run. Instead:
  1. the file (after Compose's `${VAR:-default}` interpolation) validates against the Compose
     specification's JSON schema as the `docker-compose` 1.29.2 wheel ships it
     (compose/config/compose_spec.json; the wheel is installed without its dependencies, only
     that file is read), strict (`additionalProperties: false`) for services, volumes and
     healthchecks;
  2. structural checks the schema cannot make: every dependency, shared network namespace,
     named volume and secret exists, no secret has a default, every container is locked down,
     and only the control plane gets the control token;
  3. each compose service is held to the chart container it stands for, rendered by helm: the
     same image, command, RLHF_* settings (names, and values but for the hosts of addresses),
     ports, mount paths (a secret's file counts as the chart's Secret folder) and Triton flags.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import PurePosixPath

import jsonschema_rs
import pytest
import yaml

from tests.integration.test_helm_chart import (
    CHART,
    EXAMPLES,
    ROOT,
    SECRET,
    container,
    pod_specs,
    render,
)

COMPOSE = ROOT / "docker" / "compose.yaml"
SCHEMA = importlib.resources.files("compose").joinpath("config/compose_spec.json")
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
PREFIX = "rlhf-rlhf-platform-"
# chart pod/container -> compose service
COUNTERPARTS = {
    **{
        f"{PREFIX}{svc}/{name}": f"{svc}-{role}"
        for svc in ("policy", "reward", "reference")
        for name, role in (
            ("model-repository", "repository"),
            ("service", "service"),
            ("triton", "triton"),
        )
    },
    f"{PREFIX}rollout/worker": "rollout",
    f"{PREFIX}trainer/trainer": "trainer",
    f"{PREFIX}gateway/gateway": "gateway",
    f"{PREFIX}curator/curator": "curator",
    f"{PREFIX}refresh/refresh": "refresh",
    f"{PREFIX}topics/topics": "topics",
}
SANDBOXES = {"policy", "reward", "reference"}  # the pods' network namespaces
COMPOSE_ONLY = SANDBOXES | {"volume-owner", "kafka"}  # kafka: held to kafka.local below
ADDRESSES = re.compile(r"_(ADDRESS|ADDRESSES|URL|BOOTSTRAP_SERVERS)$")
CHART_ONLY_ENV = {"POD_NAME"}  # from the downward API
# What has no default and must come from the host: the gateway's key digests, the control token.
HOST_SECRETS = {
    "RLHF_GATEWAY_API_KEY_SHA256": "0" * 64,
    "RLHF_CONTROL_TOKEN_FILE": "/home/me/.config/rlhf/control-token",
}
# The services that hold the control token (the chart's policy and reward `service` containers,
# trainer and refresh), and where it is.
CONTROL_PLANE = {"policy-service", "reward-service", "trainer", "refresh"}
CONTROL_TOKEN = "/run/secrets/rlhf-control/token"
VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(node, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(match):
        value = env.get(match["name"], "")
        if value:
            return value
        if match["op"] == ":?":
            raise KeyError(f"{match['name']}: {match['arg']}")
        return match["arg"] or ""

    return VARIABLE.sub(one, node)


def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(raw(), HOST_SECRETS)


@pytest.fixture(scope="module")
def chart() -> dict[str, dict]:
    """Every container of the chart's minimal install, by `pod/container`."""
    specs = pod_specs(render(*SECRET))
    return {
        f"{pod}/{c['name']}": c
        for pod, spec in specs.items()
        for c in spec["containers"] + spec.get("initContainers", [])
    }


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def secret_files(service: dict) -> dict[str, str]:
    """secret -> the file it is mounted as (relative targets are under /run/secrets)."""
    out = {}
    for item in service.get("secrets", []):
        source = item if isinstance(item, str) else item["source"]
        target = source if isinstance(item, str) else item.get("target", source)
        out[source] = str(PurePosixPath("/run/secrets") / target)
    return out


def mounts(service: dict) -> dict[str, bool]:
    """target -> read-only, from short-syntax volumes (`source:target[:ro]`), and each secret's
    folder (read-only): compose mounts the secret's one file, the chart its Secret's folder."""
    out = {}
    for item in service.get("volumes", []):
        parts = item.split(":")
        out[parts[1]] = parts[2:] == ["ro"]
    for path in secret_files(service).values():
        out[str(PurePosixPath(path).parent)] = True
    return out


def test_the_schema_is_strict_and_refuses_a_misspelt_key(compose):
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()))
    assert validator.is_valid(compose)
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["enviroment"] = {}
    errors = [e.message for e in validator.iter_errors(broken)]
    assert any("enviroment" in message for message in errors), errors
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["depends_on"]["topics"] = {"condition": "service_done"}
    assert not validator.is_valid(broken)


@pytest.mark.parametrize("variable", sorted(HOST_SECRETS))
def test_the_gateway_key_and_the_control_token_have_no_default(variable):
    given = {k: v for k, v in HOST_SECRETS.items() if k != variable}
    with pytest.raises(KeyError, match=variable):
        interpolate(raw(), given)


def test_only_the_control_plane_gets_the_control_token_as_a_file(compose):
    assert compose["secrets"] == {
        "control-token": {"file": HOST_SECRETS["RLHF_CONTROL_TOKEN_FILE"]}
    }
    for name, service in compose["services"].items():
        env = environment(service)
        if name not in CONTROL_PLANE:
            assert "secrets" not in service, name
            assert not [k for k in env if k.startswith("RLHF_CONTROL_")], name
            continue
        assert secret_files(service) == {"control-token": CONTROL_TOKEN}, name
        assert env["RLHF_CONTROL_TOKEN_FILE"] == CONTROL_TOKEN, name
        assert "RLHF_CONTROL_TOKEN" not in env, name  # never the token itself


def test_references_resolve_and_every_container_is_locked_down(compose):
    services, volumes = compose["services"], set(compose["volumes"])
    used = set()
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        mode = service.get("network_mode", "")
        if mode:
            assert mode.startswith("service:") and mode.split(":", 1)[1] in SANDBOXES, name
            assert service["depends_on"][mode.split(":", 1)[1]] == {"condition": "service_started"}
            assert "ports" not in service
        for item in service.get("volumes", []):
            source = item.split(":")[0]
            if not source.startswith(("/", ".")):
                assert source in volumes, f"{name}: undeclared volume {source}"
                used.add(source)
        for secret in secret_files(service):
            assert secret in compose.get("secrets", {}), f"{name}: undeclared secret {secret}"
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        if name != "volume-owner":
            assert service["user"] == "1000:1000", name
        if name != "kafka":  # the broker writes its config at start, as in the chart
            assert service.get("read_only") is True, name
    assert used == volumes
    owner = services["volume-owner"]
    assert owner["cap_add"] == ["CHOWN"] and owner["restart"] == "no"
    assert {m.split(":")[0] for m in owner["volumes"]} == volumes - {"kafka-data"}


def test_each_service_runs_what_its_chart_container_runs(compose, chart):
    services = compose["services"]
    assert set(COUNTERPARTS.values()) == set(services) - COMPOSE_ONLY
    assert set(COUNTERPARTS) == set(chart)
    for where, name in COUNTERPARTS.items():
        ours, theirs = services[name], chart[where]
        assert ours["image"] == theirs["image"], where  # repository and tag (appVersion)
        assert ours["image"].endswith(f":{APP_VERSION}")
        argv = (theirs.get("command") or []) + (theirs.get("args") or [])
        assert ours["command"] == argv, where
        env = environment(ours)
        chart_env = {
            e["name"]: e.get("value")
            for e in theirs.get("env", [])
            if e["name"] not in CHART_ONLY_ENV
        }
        assert set(env) == set(chart_env), (where, set(env) ^ set(chart_env))
        for key, value in chart_env.items():
            if value is None or key in ("MASTER_ADDR", "RLHF_GATEWAY_CORS_ORIGINS"):
                continue  # from a Secret or the downward API; or the host's own choice
            if ADDRESSES.search(key):
                ours_port = [a.rsplit(":", 1)[1] for a in env[key].split(",")]
                assert ours_port == [a.rsplit(":", 1)[1] for a in value.split(",")], (where, key)
            else:
                assert env[key] == value, (where, key, env[key], value)
        chart_mounts = {
            m["mountPath"]: m.get("readOnly", False)
            for m in theirs.get("volumeMounts", [])
            if m["mountPath"] not in ("/tmp", "/dev/shm")
        }
        assert mounts(ours) == chart_mounts, where


def test_addresses_name_the_compose_services_of_the_right_components(compose):
    env = {name: environment(s) for name, s in compose["services"].items()}
    assert env["rollout"]["RLHF_ROLLOUT_POLICY_ADDRESS"] == "policy:50051"
    assert env["rollout"]["RLHF_ROLLOUT_REWARD_ADDRESS"] == "reward:50051"
    assert env["rollout"]["RLHF_ROLLOUT_REFERENCE_ADDRESS"] == "reference:50051"
    assert env["trainer"]["RLHF_TRAINER_POLICY_ADDRESSES"] == "policy:50051"
    assert env["gateway"]["RLHF_GATEWAY_POLICY_URL"] == "policy:50051"
    assert env["refresh"]["RLHF_REFRESH_REWARD_ADDRESS"] == "reward:50051"
    for name, variables in env.items():
        if "RLHF_KAFKA_BOOTSTRAP_SERVERS" in variables:
            assert variables["RLHF_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
    for svc in SANDBOXES:  # Triton's gRPC on the shared loopback, as in the pod
        assert env[f"{svc}-service"]["RLHF_TRITON_URL"] == "127.0.0.1:8001"


def test_the_published_ports_are_the_chart_ports(compose, chart):
    gateway = compose["services"]["gateway"]
    port = next(p["containerPort"] for p in chart[f"{PREFIX}gateway/gateway"]["ports"])
    assert gateway["ports"] == [f"127.0.0.1:{port}:{port}"]  # the host's loopback only
    published = [n for n, s in compose["services"].items() if "ports" in s]
    assert published == ["gateway"]


def test_the_broker_is_the_charts_local_kafka(compose):
    docs = render("-f", str(EXAMPLES["values-cpu-dev"]))
    spec = pod_specs(docs)[f"{PREFIX}kafka"]
    theirs = container(spec, "kafka")
    ours = compose["services"]["kafka"]
    assert ours["image"] == theirs["image"] == "apache/kafka:4.1.1"
    chart_env = {e["name"]: e["value"] for e in theirs["env"]}
    env = environment(ours)
    assert set(env) == set(chart_env)
    for key, value in chart_env.items():
        if key != "KAFKA_ADVERTISED_LISTENERS":
            assert env[key] == value, key
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert mounts(ours) == {"/var/lib/kafka/data": False}
