"""The Helm chart, checked with the real helm and kubeconform binaries (built by `make setup`).

helm/check.sh runs once (values table, lint, templates, strict offline schema validation); the
tests below then render the chart themselves and assert facts about the manifests: what exists,
what every container carries, what the GPU values change, and what is refused; the topics hook, the policy's HPA, monitoring behind its API, the local Kafka, the examples and
the generated values table are tested in tests/integration/deploy/test_helm_operations.py, and
the NetworkPolicies' flows in tests/integration/deploy/test_helm_network_policies.py.

    PYTHONPATH=. python -m pytest tests/integration/test_helm_chart.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.common.control_auth import ControlSettings
from services.common.settings import KafkaSettings
from services.common.topics import ANNOTATION_QUEUE, PREFERENCES, TOPICS
from services.curator.settings import CuratorSettings
from services.gateway.settings import GatewaySettings
from services.judge.settings import JudgeSettings
from services.policy.settings import PolicySettings
from services.reference.settings import ReferenceSettings
from services.refresh.settings import RefreshSettings
from services.reward.settings import RewardSettings
from services.rollout.settings import RolloutSettings
from services.trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "rlhf-platform"
PRODUCTION = CHART / "ci" / "production-values.yaml"
EXAMPLES = {p.stem: p for p in sorted((CHART / "examples").glob("values-*.yaml"))}
CACHE = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf-platform"))
KUBE_VERSION = "1.33.0"
CONTROL_SECRET = ["--set", "controlPlane.existingSecret=rlhf-control"]
GATEWAY_SECRET = ["--set", "gateway.apiKeys.existingSecret=rlhf-gateway-keys"]
SECRET = CONTROL_SECRET + GATEWAY_SECRET  # the Secrets an install must name
OPERATOR = ["--api-versions", "monitoring.coreos.com/v1"]
MODEL_SERVICES = ("policy", "reward", "reference")
# The judge (off by default), as helm/check.sh renders it: its own model in a Triton sidecar, a
# constitution, publishing (with the production values: GPUs, NetworkPolicies); or through the
# policy, with no sidecar. --set-json: `--set` would pass the confidences as strings.
JUDGE_MODEL = ["--set", "judge.enabled=true"]
JUDGE_MODEL += ["--set", "judge.rubricFile=services/judge/constitutions/v1.yaml"]
JUDGE_MODEL += ["--set", "judge.publish=true", "--set-json", "judge.publishMinConfidence=0.5"]
JUDGE_MODEL += ["--set-json", "judge.annotationMaxConfidence=0.2"]
JUDGE_POLICY = ["--set", "judge.enabled=true,judge.throughPolicy=true,networkPolicy.enabled=true"]
WORKLOADS = ("Deployment", "StatefulSet", "Job")
LONG_RUNNING = ("Deployment", "StatefulSet")


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        [str(CACHE / "tools"), str(Path(sys.executable).parent), env["PATH"]]
    )
    env["PYTHON"] = sys.executable
    env["RLHF_CACHE"] = str(CACHE)
    return env


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv, capture_output=True, text=True, env=tool_env(), timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{argv[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def render(*args: str) -> list[dict]:
    out = run(
        [
            "helm",
            "template",
            "rlhf",
            str(CHART),
            "--namespace",
            "rlhf",
            "--kube-version",
            KUBE_VERSION,
            *args,
        ]
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: found {len(matches)}"
    return matches[0]


def pod_specs(docs: list[dict], kinds: tuple[str, ...] = WORKLOADS) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in kinds
    }


def env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


@pytest.fixture(scope="module")
def check_sh() -> subprocess.CompletedProcess:
    for tool in ("helm", "kubeconform"):
        assert (CACHE / "tools" / tool).exists(), (
            f"{tool} missing from {CACHE / 'tools'}: run `make setup`"
        )
    return run(["bash", str(ROOT / "helm" / "check.sh")], check=False)


@pytest.fixture(scope="module")
def minimal() -> list[dict]:
    return render(*SECRET)


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return render("-f", str(PRODUCTION), *OPERATOR)


@pytest.fixture(scope="module")
def judge_model() -> list[dict]:
    return render("-f", str(PRODUCTION), *JUDGE_MODEL, *OPERATOR)


@pytest.fixture(scope="module")
def judge_policy() -> list[dict]:
    return render(*SECRET, *JUDGE_POLICY)


def test_check_script_lints_renders_and_validates_strictly(check_sh):
    assert check_sh.returncode == 0, check_sh.stdout + check_sh.stderr
    # Eight renders (minimal, production, the judge of its own model and through the policy, image
    # models and the three examples) validated against two Kubernetes versions, every resource
    # valid and none skipped for want of a schema (the ServiceMonitor and PrometheusRule included).
    summaries = [l for l in check_sh.stdout.splitlines() if l.startswith("Summary:")]
    assert len(summaries) == 2, check_sh.stdout
    for line in summaries:
        assert "in 8 files" in line and "Invalid: 0, Errors: 0, Skipped: 0" in line, line
    assert ">> values table" in check_sh.stdout


def test_validation_refuses_an_unknown_field(check_sh, minimal, tmp_path):
    assert check_sh.returncode == 0
    locations = run(
        [
            sys.executable,
            str(ROOT / "helm" / "k8s_schemas.py"),
            str(CACHE / "k8s-schemas"),
            KUBE_VERSION,
        ]
    ).stdout.splitlines()
    deployment = find(minimal, "Deployment", "rlhf-rlhf-platform-policy")
    deployment["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = run(
        [
            "kubeconform",
            "-strict",
            "-kubernetes-version",
            KUBE_VERSION,
            "-schema-location",
            locations[0],
            str(bad),
        ],
        check=False,
    )
    assert result.returncode == 1
    assert "additional properties 'resourcez' not allowed" in result.stdout


def test_policy_has_a_headless_service_over_its_replicas(minimal, production):
    headless = find(minimal, "Service", "rlhf-rlhf-platform-policy-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"]["app.kubernetes.io/component"] == "policy"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert find(production, "Deployment", "rlhf-rlhf-platform-policy")["spec"]["replicas"] == 3
    trainer = container(pod_specs(minimal)["rlhf-rlhf-platform-trainer"], "trainer")
    assert env_of(trainer)["RLHF_TRAINER_POLICY_ADDRESSES"] == (
        "rlhf-rlhf-platform-policy-headless.rlhf.svc.cluster.local:50051"
    )


def test_refresh_publishes_to_a_shared_volume_every_reward_replica_follows(minimal):
    claim = find(minimal, "PersistentVolumeClaim", "rlhf-rlhf-platform-refresh-versions")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    specs = pod_specs(minimal)
    refresh = container(specs["rlhf-rlhf-platform-refresh"], "refresh")
    env = env_of(refresh)
    assert env["RLHF_REFRESH_VERSIONS_ROOT"] == "/reward-versions"
    assert (
        env["RLHF_REFRESH_REWARD_ADDRESS"]
        == "rlhf-rlhf-platform-reward-headless.rlhf.svc.cluster.local:50051"
    )
    assert (
        find(minimal, "Service", "rlhf-rlhf-platform-reward-headless")["spec"]["clusterIP"]
        == "None"
    )
    assert {"name": "versions", "mountPath": "/reward-versions"} in refresh["volumeMounts"]
    reward = specs["rlhf-rlhf-platform-reward"]
    assert {
        "name": "reward-versions",
        "persistentVolumeClaim": {
            "claimName": "rlhf-rlhf-platform-refresh-versions",
            "readOnly": True,
        },
    } in reward["volumes"]
    for name in ("service", "triton"):  # Triton reads the files the reload order names
        mounts = container(reward, name)["volumeMounts"]
        assert {
            "name": "reward-versions",
            "mountPath": "/reward-versions",
            "readOnly": True,
        } in mounts, name
    assert env_of(container(reward, "service"))["RLHF_REWARD_VERSIONS_ROOT"] == "/reward-versions"
    off = pod_specs(render(*SECRET, "--set", "refresh.enabled=false"))
    assert "rlhf-rlhf-platform-refresh" not in off
    assert "RLHF_REWARD_VERSIONS_ROOT" not in env_of(
        container(off["rlhf-rlhf-platform-reward"], "service")
    )


def test_every_container_has_resources_probes_and_a_locked_down_context(
    minimal, production, judge_model, judge_policy
):
    # policy reward reference rollout trainer gateway curator refresh, and the topics Job; and the
    # judge where it is enabled
    for docs, pods in ((minimal, 9), (production, 9), (judge_model, 10), (judge_policy, 10)):
        specs = pod_specs(docs)
        assert len(specs) == pods
        for name, spec in specs.items():
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["automountServiceAccountToken"] is False, name
            for c in spec["containers"] + spec.get("initContainers", []):
                where = f"{name}/{c['name']}"
                assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], (
                    where
                )
                ctx = c["securityContext"]
                assert ctx["capabilities"]["drop"] == ["ALL"], where
                assert ctx["allowPrivilegeEscalation"] is False, where
                assert ctx["readOnlyRootFilesystem"] is True, where
        for name, spec in pod_specs(docs, LONG_RUNNING).items():  # a Job's pod runs to its end
            for c in spec["containers"]:
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    assert probe in c, f"{name}/{c['name']} lacks {probe}"


def test_model_pods_run_the_service_beside_triton_on_a_generated_repository(minimal):
    for component in MODEL_SERVICES:
        spec = pod_specs(minimal)[f"rlhf-rlhf-platform-{component}"]
        assert [c["name"] for c in spec["initContainers"]] == ["model-repository"]
        assert [c["name"] for c in spec["containers"]] == ["service", "triton"]
        init, service, triton = (
            container(spec, n) for n in ("model-repository", "service", "triton")
        )
        assert init["command"] == ["python", "-m", f"services.{component}", "repository"]
        upper = component.upper()
        assert env_of(init)[f"RLHF_{upper}_MODEL_REPOSITORY"] == "/model-repository"
        # gRPC health probes on the service; Triton only on the pod's loopback, with no HTTP API.
        port = service["ports"][0]["containerPort"]
        assert service["readinessProbe"]["grpc"]["port"] == port == 50051
        assert env_of(service)["RLHF_TRITON_URL"] == "127.0.0.1:8001"
        assert (
            env_of(service)["RLHF_KAFKA_BOOTSTRAP_SERVERS"] == "rlhf-kafka-bootstrap.rlhf.svc:9092"
        )
        assert (
            "--grpc-address=127.0.0.1" in triton["args"] and "--allow-http=false" in triton["args"]
        )
        assert f"--load-model={component}" in triton["args"]
        mounts = {m["name"]: m for m in triton["volumeMounts"]}
        assert mounts["model-repository"]["readOnly"] is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert (
            "emptyDir" in volumes["model-repository"]
            and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        )
        assert find(minimal, "PodDisruptionBudget", f"rlhf-rlhf-platform-{component}")


def test_gateway_probes_secret_reference_and_no_secret_rendered(minimal, production):
    assert not [d for d in minimal + production if d["kind"] == "Secret"]
    gateway = container(pod_specs(minimal)["rlhf-rlhf-platform-gateway"], "gateway")
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = env_of(gateway)
    assert env["RLHF_GATEWAY_API_KEY_SHA256"] == {
        "secretKeyRef": {"name": "rlhf-gateway-keys", "key": "api-key-sha256"}
    }
    assert env["RLHF_GATEWAY_CORS_ORIGINS"] == ""  # no origin allowed by default
    assert (
        env_of(container(pod_specs(production)["rlhf-rlhf-platform-gateway"], "gateway"))[
            "RLHF_GATEWAY_CORS_ORIGINS"
        ]
        == "https://chat.example.com"
    )


def test_rendering_fails_without_a_gateway_secret():
    result = run(
        ["helm", "template", "rlhf", str(CHART), "--kube-version", KUBE_VERSION, *CONTROL_SECRET],
        check=False,
    )
    assert result.returncode != 0
    assert "gateway.apiKeys.existingSecret is required" in result.stderr
    assert "ships no default key" in result.stderr
    # With the gateway off, nothing needs the Secret.
    docs = render(*CONTROL_SECRET, "--set", "gateway.enabled=false")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-gateway")]


def test_rendering_fails_without_a_control_secret():
    result = run(
        ["helm", "template", "rlhf", str(CHART), "--kube-version", KUBE_VERSION, *GATEWAY_SECRET],
        check=False,
    )
    assert result.returncode != 0
    assert "controlPlane.existingSecret is required" in result.stderr
    assert "kubectl create secret generic rlhf-control" in result.stderr
    assert "ships no default token" in result.stderr
    # Without the four pods that hold the token, nothing needs the Secret.
    off = [f"{c}.enabled=false" for c in ("policy", "reward", "trainer", "refresh")]
    docs = render(*GATEWAY_SECRET, "--set", ",".join(off))
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} == {
        f"rlhf-rlhf-platform-{c}" for c in ("reference", "rollout", "gateway", "curator")
    }


# The control plane (services/common/control_auth.py): the pod -> the one container that holds
# the control token. The policy and reward check it; the trainer and the refresh send it.
CONTROL_CONTAINERS = {"policy": "service", "reward": "service", "trainer": "trainer"}
CONTROL_CONTAINERS["refresh"] = "refresh"


def uses_secret(spec: dict, secret: str) -> list[str]:
    """Where a pod spec takes anything from the Secret `secret`: volumes, env, envFrom."""
    found = [
        f"volume {v['name']}"
        for v in spec.get("volumes", [])
        if v.get("secret", {}).get("secretName") == secret
        or any(
            source.get("secret", {}).get("name") == secret
            for source in v.get("projected", {}).get("sources", [])
        )
    ]
    for c in spec["containers"] + spec.get("initContainers", []):
        found += [
            f"{c['name']} env {e['name']}"
            for e in c.get("env", [])
            if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == secret
        ]
        found += [
            f"{c['name']} envFrom"
            for e in c.get("envFrom", [])
            if e.get("secretRef", {}).get("name") == secret
        ]
    return found


@pytest.mark.parametrize("key", ["token", "control-token"])
def test_only_the_control_plane_gets_the_control_token_as_a_read_only_file(
    key, minimal, production, judge_model, judge_policy, monkeypatch
):
    # The judge calls no control method: it gets no token, in either mode.
    renders = (minimal, production, judge_model, judge_policy) if key == "token" else ()
    renders += (render(*SECRET, "--set", f"controlPlane.key={key}"),)
    for docs in renders:
        specs = pod_specs(docs)
        for pod, spec in specs.items():
            component = pod.removeprefix("rlhf-rlhf-platform-")
            if component not in CONTROL_CONTAINERS:  # reference, rollout, ..., topics, judge
                assert uses_secret(spec, "rlhf-control") == [], pod
                for c in spec["containers"] + spec.get("initContainers", []):
                    assert not [k for k in env_of(c) if k.startswith("RLHF_CONTROL_")], pod
                continue
            # One Secret volume with that key only, never an environment variable.
            assert uses_secret(spec, "rlhf-control") == ["volume control-token"], pod
            (volume,) = [v for v in spec["volumes"] if v["name"] == "control-token"]
            (item,) = volume["secret"]["items"]
            assert item["key"] == key, pod
            assert volume["secret"]["defaultMode"] == 0o440, pod
            for c in spec["containers"] + spec.get("initContainers", []):
                where = f"{pod}/{c['name']}"
                mounts = [m for m in c.get("volumeMounts", []) if m["name"] == "control-token"]
                env = env_of(c)
                if c["name"] != CONTROL_CONTAINERS[component]:  # Triton, the init container
                    assert not mounts and "RLHF_CONTROL_TOKEN_FILE" not in env, where
                    continue
                (mount,) = mounts
                assert mount["readOnly"] is True and "subPath" not in mount, where  # rotates
                path = f"{mount['mountPath']}/{item['path']}"
                assert env["RLHF_CONTROL_TOKEN_FILE"] == path, where
                assert "RLHF_CONTROL_TOKEN" not in env, where
                with monkeypatch.context() as m:  # the name is the one the services read
                    m.setenv("RLHF_CONTROL_TOKEN_FILE", path)
                    assert str(ControlSettings().token_file) == path
        assert {p.removeprefix("rlhf-rlhf-platform-") for p in specs} >= set(CONTROL_CONTAINERS)


def test_allowed_client_identities_reach_the_services_that_check_them(monkeypatch):
    docs = render(*SECRET, "--set", "controlPlane.allowedIdentities={trainer,refresh}")
    specs = pod_specs(docs)
    for component in ("policy", "reward"):
        env = env_of(container(specs[f"rlhf-rlhf-platform-{component}"], "service"))
        assert env["RLHF_CONTROL_ALLOWED_IDENTITIES"] == "trainer,refresh", component
        monkeypatch.setenv(
            "RLHF_CONTROL_ALLOWED_IDENTITIES", env["RLHF_CONTROL_ALLOWED_IDENTITIES"]
        )
        assert ControlSettings().allowed_identities == ("trainer", "refresh")
    result = run(
        ["helm", "template", "rlhf", str(CHART), "--kube-version", KUBE_VERSION, *SECRET]
        + ["--set", "controlPlane.allowedIdentities={a b}"],
        check=False,
    )
    assert result.returncode != 0 and "/controlPlane/allowedIdentities/0" in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--set", "gateway.corsOrigins[0]=*"], "/gateway/corsOrigins/0"),
        (["--set", "policy.extraEnv.PATH=/tmp"], "invalid propertyName 'PATH'"),
        (["--set", "policy.replicaCount=0"], "/policy/replicaCount"),
        (["--set", "trainer.algorithm=sac"], "/trainer/algorithm"),
        (["--set", "kafka.bootstrapServers=no-port"], "/kafka/bootstrapServers"),
        (["--set", "podSecurityContext.runAsNonRoot=false"], "/podSecurityContext/runAsNonRoot"),
        (["--set", "policy.resources=null"], "policy"),
    ],
)
def test_values_schema_refuses_bad_values(override, message):
    result = run(
        [
            "helm",
            "template",
            "rlhf",
            str(CHART),
            "--kube-version",
            KUBE_VERSION,
            *SECRET,
            *override,
        ],
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_gpu_values_add_gpu_limits_and_bf16(minimal, production):
    def gpu_limits(docs):
        return {
            f"{n}/{c['name']}": c["resources"]["limits"].get("nvidia.com/gpu")
            for n, spec in pod_specs(docs).items()
            for c in spec["containers"]
        }

    assert set(gpu_limits(minimal).values()) == {None}
    limits = gpu_limits(production)
    for component in MODEL_SERVICES:
        assert limits[f"rlhf-rlhf-platform-{component}/triton"] == 1
        assert limits[f"rlhf-rlhf-platform-{component}/service"] is None  # the model runs in Triton
    assert limits["rlhf-rlhf-platform-trainer/trainer"] == 1
    assert limits["rlhf-rlhf-platform-gateway/gateway"] is None
    for docs, device, dtype in ((minimal, "cpu", "float32"), (production, "gpu", "bfloat16")):
        spec = pod_specs(docs)["rlhf-rlhf-platform-policy"]
        for name in ("model-repository", "service"):
            env = env_of(container(spec, name))
            assert (env["RLHF_POLICY_DEVICE"], env["RLHF_POLICY_DTYPE"]) == (device, dtype)
    triton = container(pod_specs(production)["rlhf-rlhf-platform-policy"], "triton")
    assert "--allow-gpu-metrics=true" in triton["args"]
    assert pod_specs(production)["rlhf-rlhf-platform-policy"]["nodeSelector"] == {
        "nvidia.com/gpu.present": "true"
    }


def test_trainer_ranks_are_statefulset_pods_with_checkpoint_volumes(production):
    sts = find(production, "StatefulSet", "rlhf-rlhf-platform-trainer")
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == "rlhf-rlhf-platform-trainer-headless"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "checkpoints"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    env = env_of(container(sts["spec"]["template"]["spec"], "trainer"))
    assert env["WORLD_SIZE"] == "2"
    assert env["RANK"] == {
        "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}
    }
    assert env["MASTER_ADDR"] == (
        "rlhf-rlhf-platform-trainer-0.rlhf-rlhf-platform-trainer-headless.rlhf.svc.cluster.local"
    )
    headless = find(production, "Service", "rlhf-rlhf-platform-trainer-headless")
    assert headless["spec"]["publishNotReadyAddresses"] is True


def test_production_adds_ingress_autoscaling_network_policies_and_monitoring(minimal, production):
    kinds = {d["kind"] for d in minimal}
    assert not kinds & {
        "Ingress",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    }
    ingress = find(production, "Ingress", "rlhf-rlhf-platform-gateway")
    assert ingress["spec"]["rules"][0]["host"] == "rlhf.example.com"
    assert ingress["spec"]["tls"][0]["secretName"] == "rlhf-example-tls"
    hpa = find(production, "HorizontalPodAutoscaler", "rlhf-rlhf-platform-gateway")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert "replicas" not in find(production, "Deployment", "rlhf-rlhf-platform-gateway")["spec"]
    policies = {d["metadata"]["name"] for d in production if d["kind"] == "NetworkPolicy"}
    assert policies == {  # every pod of the release, the topics Job's included
        f"rlhf-rlhf-platform-{c}"
        for c in ("policy", "reward", "reference", "rollout", "trainer", "gateway", "curator")
        + ("refresh", "topics")
    }
    monitor = find(production, "ServiceMonitor", "rlhf-rlhf-platform")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {
        "metrics",
        "triton-metrics",
        "http",
    }
    env = env_of(container(pod_specs(production)["rlhf-rlhf-platform-rollout"], "worker"))
    assert env["RLHF_KAFKA_BOOTSTRAP_SERVERS"].count(":9092") == 3


# What each container's command runs, and the settings that module reads from its environment.
ENTRY_POINT_SETTINGS = {
    "services.policy": PolicySettings,
    "services.reward": RewardSettings,
    "services.reference": ReferenceSettings,
    "services.rollout": RolloutSettings,
    "services.trainer": TrainerSettings,
    "services.gateway": GatewaySettings,
    "services.curator": CuratorSettings,
    "services.refresh": RefreshSettings,
    "services.cli": KafkaSettings,  # the topics hook: `python -m services.cli topics ensure`
    "services.judge": JudgeSettings,  # only where judge.enabled
}
# Entry points whose processes also read the control plane's settings (the token), beside their
# own: the policy and reward check it, the trainer and the refresh send it.
CONTROL_READERS = {f"services.{c}" for c in ("policy", "reward", "trainer", "refresh")}
# Values a Secret would supply, for variables the chart takes from one.
SECRET_VALUES = {"RLHF_GATEWAY_API_KEY_SHA256": "0" * 64}


def python_containers(docs: list[dict]) -> list[tuple[str, str, dict[str, str]]]:
    """(where, module, literal env) of every container that runs `python -m <module>`."""
    found = []
    for pod, spec in pod_specs(docs).items():
        for c in spec["containers"] + spec.get("initContainers", []):
            argv = (c.get("command") or []) + (c.get("args") or [])
            if argv[:2] != ["python", "-m"]:
                continue
            env = {}
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif e["name"].startswith("RLHF_"):
                    env[e["name"]] = SECRET_VALUES[
                        e["name"]
                    ]  # a new secret-fed variable: add it above
            found.append((f"{pod}/{c['name']}", argv[2], env))
    return found


def build(monkeypatch, settings_class: type, env: dict[str, str]):
    """`settings_class`, built by pydantic from exactly `env`."""
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith("RLHF_")]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        return settings_class()


def settings_from(monkeypatch, module: str, env: dict[str, str]):
    """The entry point's settings, built by pydantic from exactly `env`."""
    return build(monkeypatch, ENTRY_POINT_SETTINGS[module], env)


def reads(monkeypatch, settings_class: type, env: dict[str, str], key: str) -> bool:
    """Whether `settings_class` reads `key`: given an odd value, it changes or refuses it."""
    built = build(monkeypatch, settings_class, env).model_dump()
    try:
        odd = build(monkeypatch, settings_class, {**env, key: "odd-value-\u2603"})
    except ValidationError:
        return True
    return odd.model_dump() != built


def readers(module: str) -> list[type]:
    """The settings classes the entry point's process builds from its environment."""
    extra = [ControlSettings] if module in CONTROL_READERS else []
    return [ENTRY_POINT_SETTINGS[module], *extra]


def test_every_setting_the_chart_passes_is_one_its_service_reads(
    minimal, production, judge_model, judge_policy, monkeypatch
):
    """The services' settings ignore variables they do not know (extra="ignore"), so a misspelt or
    stale name in the chart would be dropped in silence: each one is checked on the settings
    class itself. And each container's whole environment must build its settings: every required
    field set, every value valid. The variables every Python container gets (the Kafka block)
    need only be read by the services that use Kafka. The control plane's processes also read
    `ControlSettings` (services/common/control_auth.py: the control token)."""
    shared = {"RLHF_KAFKA_BOOTSTRAP_SERVERS", "RLHF_KAFKA_CLIENT_ID"}
    checked, shared_readers, control = 0, {key: set() for key in shared}, set()
    without_judge = set(ENTRY_POINT_SETTINGS) - {"services.judge"}
    for docs, modules in (
        (minimal, without_judge),
        (production, without_judge),
        (judge_model, set(ENTRY_POINT_SETTINGS)),
        (judge_policy, set(ENTRY_POINT_SETTINGS)),
    ):
        containers = python_containers(docs)
        assert {module for _, module, _ in containers} == modules
        for where, module, env in containers:
            for settings_class in readers(module):
                build(monkeypatch, settings_class, env)  # raises when a field is missing or bad
            for key in sorted(k for k in env if k.startswith("RLHF_")):
                if key in shared:
                    if reads(monkeypatch, ENTRY_POINT_SETTINGS[module], env, key):
                        shared_readers[key].add(module)
                    continue
                assert any(reads(monkeypatch, c, env, key) for c in readers(module)), (
                    f"{where}: {module} never reads {key}"
                )
                if reads(monkeypatch, ControlSettings, env, key):
                    control.add(module)
                checked += 1
    assert checked > 80
    assert control == CONTROL_READERS  # each of them is given the token's file
    for key in shared:
        assert {
            "services.policy",
            "services.rollout",
            "services.trainer",
            "services.gateway",
            "services.curator",
            "services.refresh",
        } <= shared_readers[key], key


def test_the_chart_points_each_service_at_the_others_and_at_its_device(
    minimal, production, monkeypatch
):
    for docs, device, dtype in ((minimal, "cpu", "float32"), (production, "gpu", "bfloat16")):
        built = {
            where: settings_from(monkeypatch, module, env)
            for where, module, env in python_containers(docs)
        }
        rollout = built["rlhf-rlhf-platform-rollout/worker"]
        assert (rollout.policy_address, rollout.reward_address, rollout.reference_address) == (
            "rlhf-rlhf-platform-policy-headless.rlhf.svc.cluster.local:50051",
            "rlhf-rlhf-platform-reward-headless.rlhf.svc.cluster.local:50051",
            "rlhf-rlhf-platform-reference-headless.rlhf.svc.cluster.local:50051",
        )
        assert str(rollout.dataset) == "/models/prompts/prompts.jsonl"
        for component in MODEL_SERVICES:
            for name in ("model-repository", "service"):
                settings = built[f"rlhf-rlhf-platform-{component}/{name}"]
                assert (settings.device, settings.dtype) == (device, dtype), f"{component}/{name}"


ROLLOUT_ADDRESSES = {
    c: f"RLHF_ROLLOUT_{c.upper()}_ADDRESS" for c in ("policy", "reward", "reference")
}


def rollout_addresses(docs: list[dict]) -> dict[str, str]:
    env = env_of(container(pod_specs(docs)["rlhf-rlhf-platform-rollout"], "worker"))
    return {c: env[name] for c, name in ROLLOUT_ADDRESSES.items()}


@pytest.mark.parametrize(
    ("override", "headless"),
    [
        ([], {"policy", "reward", "reference"}),  # reward's: the refresh reloads every replica
        (["--set", "reference.headlessService=false"], {"policy", "reward"}),
        (["--set", "refresh.enabled=false"], {"policy", "reference"}),
        (
            ["--set", "refresh.enabled=false,reward.headlessService=true"],
            {"policy", "reward", "reference"},
        ),
        (["--set", "policy.headlessService=false,reference.headlessService=false"], {"reward"}),
    ],
)
def test_the_rollout_worker_calls_every_replica_through_a_headless_service(override, headless):
    """The worker's channels (services/common/channels.py) take one name that gRPC resolves again
    and go round robin over what it resolves to: a headless Service gives every ready replica,
    a ClusterIP one VIP that pins each worker's connection to one replica. So the chart names the
    headless Service wherever one is rendered, and the ClusterIP Service only where none is."""
    docs = render(*SECRET, *override)
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    for component, address in rollout_addresses(docs).items():
        name = f"rlhf-rlhf-platform-{component}"
        host, port = address.rsplit(":", 1)
        assert port == "50051"
        if component in headless:
            assert host == f"{name}-headless.rlhf.svc.cluster.local", component
            service = services[f"{name}-headless"]
            assert service["clusterIP"] == "None"
            assert service["selector"]["app.kubernetes.io/component"] == component
            assert [p["port"] for p in service["ports"]] == [50051]
        else:
            assert host == name and f"{name}-headless" not in services, component
            assert services[name]["type"] == "ClusterIP"


def test_kafka_sasl_login_comes_from_a_secret_into_every_python_container(minimal, monkeypatch):
    login = [
        "--set",
        "kafka.securityProtocol=SASL_SSL",
        "--set",
        "kafka.sasl.mechanism=SCRAM-SHA-512",
    ]
    secret = ["--set", "kafka.sasl.existingSecret=rlhf-kafka-login"]
    docs = render(*SECRET, *login, *secret)
    assert not [d for d in docs if d["kind"] == "Secret"]
    checked = 0
    for pod, spec in pod_specs(docs).items():
        for c in spec["containers"] + spec.get("initContainers", []):
            env = env_of(c)
            if ((c.get("command") or []) + (c.get("args") or []))[:2] != ["python", "-m"]:
                assert not [k for k in env if k.startswith("RLHF_KAFKA_")], f"{pod}/{c['name']}"
                continue
            assert env["RLHF_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
            assert env["RLHF_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
            for key in ("username", "password"):  # by reference: the chart renders no credential
                assert env[f"RLHF_KAFKA_SASL_{key.upper()}"] == {
                    "secretKeyRef": {"name": "rlhf-kafka-login", "key": key}
                }
            # The names are the ones KafkaSettings reads (the Secret's values standing in).
            literal = {
                k: v for k, v in env.items() if k.startswith("RLHF_KAFKA_") and isinstance(v, str)
            }
            kafka = build(
                monkeypatch,
                KafkaSettings,
                {**literal, "RLHF_KAFKA_SASL_USERNAME": "u", "RLHF_KAFKA_SASL_PASSWORD": "p"},
            )
            assert kafka.librdkafka_config()["sasl.mechanisms"] == "SCRAM-SHA-512"
            assert kafka.kafka_python_config()["security_protocol"] == "SASL_SSL"
            checked += 1
    assert checked >= len(ENTRY_POINT_SETTINGS)
    # The default install is unchanged: PLAINTEXT, and no security variable at all.
    for spec in pod_specs(minimal).values():
        for c in spec["containers"] + spec.get("initContainers", []):
            assert not [k for k in env_of(c) if k.startswith("RLHF_KAFKA_S")]
    # Refused: a SASL protocol without its Secret; security on the local (PLAINTEXT) broker.
    base = ["helm", "template", "rlhf", str(CHART), "--kube-version", KUBE_VERSION, *SECRET]
    result = run([*base, *login], check=False)
    assert result.returncode != 0
    assert "kafka.sasl.existingSecret is required with kafka.securityProtocol=SASL_SSL" in (
        result.stderr
    )
    result = run([*base, *login, *secret, "--set", "kafka.local.enabled=true"], check=False)
    assert result.returncode != 0
    assert "(kafka.local) listens for PLAINTEXT only" in result.stderr
    result = run([*base, "--set", "kafka.securityProtocol=SSL"], check=False)
    assert result.returncode != 0
    assert "kafka.tls.existingSecret is required with kafka.securityProtocol=SSL" in result.stderr


def test_kafka_tls_files_are_mounted_where_the_kafka_settings_are(monkeypatch, tmp_path):
    tls = ["--set", "kafka.securityProtocol=SSL", "--set", "kafka.tls.existingSecret=kafka-tls"]
    mutual = ["--set", "kafka.tls.clientCertificate=true"]
    for extra, files in (([], {"ca.crt"}), (mutual, {"ca.crt", "tls.crt", "tls.key"})):
        docs = render(*SECRET, *tls, *extra)
        checked = 0
        for pod, spec in pod_specs(docs).items():
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec["containers"] + spec.get("initContainers", []):
                env = env_of(c)
                paths = {v for k, v in env.items() if k.startswith("RLHF_KAFKA_SSL_")}
                mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
                if "RLHF_KAFKA_SECURITY_PROTOCOL" not in env:
                    assert not paths and "kafka-tls" not in mounts, f"{pod}/{c['name']}"
                    continue
                mount = mounts["kafka-tls"]
                assert mount["readOnly"] is True, f"{pod}/{c['name']}"
                secret = volumes["kafka-tls"]["secret"]
                assert secret["secretName"] == "kafka-tls"
                assert {i["path"] for i in secret["items"]} == files
                assert paths == {f"{mount['mountPath']}/{f}" for f in files}, f"{pod}/{c['name']}"
                # Those are the names KafkaSettings reads, and it accepts them together.
                for name in files:
                    (tmp_path / name).write_text("pem")
                literal = {
                    k: str(tmp_path / Path(v).name) if k.startswith("RLHF_KAFKA_SSL_") else v
                    for k, v in env.items()
                    if k.startswith("RLHF_KAFKA_") and isinstance(v, str)
                }
                config = build(monkeypatch, KafkaSettings, literal).kafka_python_config()
                assert config["security_protocol"] == "SSL" and config["ssl_cafile"]
                checked += 1
        assert checked >= len(ENTRY_POINT_SETTINGS)
    base = ["helm", "template", "rlhf", str(CHART), "--kube-version", KUBE_VERSION, *SECRET]
    result = run([*base, "--set", "kafka.tls.existingSecret=kafka-tls"], check=False)
    assert result.returncode != 0 and "uses no TLS" in result.stderr


JUDGE = "rlhf-rlhf-platform-judge"
POLICY_HEADLESS = "rlhf-rlhf-platform-policy-headless.rlhf.svc.cluster.local:50051"


def judge_settings(monkeypatch, docs: list[dict], name: str = "service") -> JudgeSettings:
    """The judge container's settings, built by pydantic from its rendered environment."""
    (env,) = [env for where, _, env in python_containers(docs) if where == f"{JUDGE}/{name}"]
    return build(monkeypatch, JudgeSettings, env)


def test_the_judge_renders_only_when_enabled(minimal, production, judge_model, judge_policy):
    for docs in (minimal, production):
        assert not [d for d in docs if "judge" in d["metadata"]["name"]]
    for docs in (judge_model, judge_policy):
        judge = {
            (d["kind"], d["metadata"]["name"]) for d in docs if "judge" in d["metadata"]["name"]
        }
        assert judge == {
            ("Deployment", JUDGE),
            ("Service", JUDGE),
            ("PodDisruptionBudget", JUDGE),
            ("NetworkPolicy", JUDGE),
        }
        service = find(docs, "Service", JUDGE)["spec"]
        assert service["selector"]["app.kubernetes.io/component"] == "judge"
        assert service["ports"][0] == {
            "name": "grpc",
            "port": 50051,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        }
        assert find(docs, "Service", JUDGE)["metadata"]["labels"]["rlhf-platform/metrics"] == "true"
    headless = render(*SECRET, "--set", "judge.enabled=true,judge.headlessService=true")
    assert find(headless, "Service", f"{JUDGE}-headless")["spec"]["clusterIP"] == "None"


def test_the_judge_of_its_own_model_runs_it_in_triton_with_its_settings(judge_model, monkeypatch):
    spec = pod_specs(judge_model)[JUDGE]
    assert [c["name"] for c in spec["initContainers"]] == ["model-repository"]
    assert [c["name"] for c in spec["containers"]] == ["service", "triton"]
    init, service, triton = (container(spec, n) for n in ("model-repository", "service", "triton"))
    assert init["command"] == ["python", "-m", "services.judge", "repository"]
    assert service["command"] == ["python", "-m", "services.judge"]
    assert "--load-model=judge" in triton["args"]  # JudgeSettings.triton_model
    # Its model costs a GPU, like the other model services' (production values: gpu.enabled).
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in service["resources"]["limits"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    repository = judge_settings(monkeypatch, judge_model, "model-repository")
    assert str(repository.model_repository) == "/model-repository"
    settings = judge_settings(monkeypatch, judge_model)
    assert settings.mode == "model" and settings.policy_address == ""
    assert str(settings.model_dir) == str(repository.model_dir) == "/models/judge"
    assert (settings.device, settings.dtype) == ("gpu", "bfloat16")
    assert settings.triton.url == "127.0.0.1:8001"
    assert str(settings.rubric_file) == "services/judge/constitutions/v1.yaml"
    assert (ROOT / settings.rubric_file).is_file()  # a path inside the image's /app
    assert settings.publish is True
    assert settings.publish_min_confidence == 0.5
    assert settings.annotation_max_confidence == 0.2
    assert (settings.grpc.port, settings.grpc.metrics_port) == (50051, 9090)
    assert settings.kafka.bootstrap_servers.count(":9092") == 3
    ports = [p["name"] for p in find(judge_model, "Service", JUDGE)["spec"]["ports"]]
    assert ports == ["grpc", "metrics", "triton-metrics"]


def test_the_judge_defaults_are_the_services_defaults(monkeypatch):
    """Left at its values' defaults, the chart changes none of the judge's behaviour: the built-in
    rubric (no RLHF_JUDGE_RUBRIC_FILE), nothing published, no annotation queue."""
    docs = render(*SECRET, "--set", "judge.enabled=true")
    env = env_of(container(pod_specs(docs)[JUDGE], "service"))
    assert "RLHF_JUDGE_RUBRIC_FILE" not in env and "RLHF_JUDGE_POLICY_ADDRESS" not in env
    settings = judge_settings(monkeypatch, docs)
    defaults = build(monkeypatch, JudgeSettings, {})
    assert settings.rubric_file == defaults.rubric_file
    assert (settings.publish, settings.publish_min_confidence) == (False, 0.0)
    assert settings.annotation_max_confidence == defaults.annotation_max_confidence == -1.0
    assert (settings.device, settings.dtype) == ("cpu", "float32")


def test_the_judge_through_the_policy_is_the_service_alone(judge_policy, monkeypatch):
    """No model of its own: no init container, no Triton, no model-repository or shm volume, no
    Triton metrics port; it asks the policy's headless Service and reads the policy's tokenizer."""
    spec = pod_specs(judge_policy)[JUDGE]
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["service"]
    assert {v["name"] for v in spec["volumes"]} == {"tmp", "models"}
    env = env_of(spec["containers"][0])
    assert "RLHF_TRITON_URL" not in env
    settings = judge_settings(monkeypatch, judge_policy)
    assert settings.mode == "policy"
    assert settings.policy_address == POLICY_HEADLESS
    assert str(settings.model_dir) == "/models/policy"
    ports = [p["name"] for p in find(judge_policy, "Service", JUDGE)["spec"]["ports"]]
    assert ports == ["grpc", "metrics"]
    # With GPUs on, the pod still asks for none and is not pinned to GPU nodes.
    gpu = pod_specs(
        render("-f", str(PRODUCTION), "--set", "judge.enabled=true,judge.throughPolicy=true")
    )
    assert "nvidia.com/gpu" not in gpu[JUDGE]["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in gpu[JUDGE]
    # Another release's PolicyService: its address as given, the tokenizer from judge.modelPath.
    other = render(*SECRET, "--set", "judge.enabled=true,judge.policyAddress=policy.other:50051")
    assert [c["name"] for c in pod_specs(other)[JUDGE]["containers"]] == ["service"]
    settings = judge_settings(monkeypatch, other)
    assert (settings.mode, settings.policy_address) == ("policy", "policy.other:50051")
    assert str(settings.model_dir) == "/models/judge"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--set", "judge.throughPolicy=true,judge.policyAddress=p:50051"],
            "judge.throughPolicy (this release's policy) or judge.policyAddress",
        ),
        (
            ["--set", "judge.throughPolicy=true,policy.enabled=false"],
            "judge.throughPolicy needs policy.enabled=true",
        ),
        (["--set-json", "judge.publishMinConfidence=1"], "/judge/publishMinConfidence"),
        (["--set", "judge.publishMinConfidence=0.5"], "/judge/publishMinConfidence"),  # a string
        (["--set-json", "judge.annotationMaxConfidence=1.5"], "/judge/annotationMaxConfidence"),
        (["--set", "judge.policyAddress=no-port"], "/judge/policyAddress"),
        (["--set", "judge.modelPath=relative"], "/judge/modelPath"),
        (["--set", "judge.extraEnv.PATH=/tmp"], "invalid propertyName 'PATH'"),
    ],
)
def test_the_judge_values_are_refused_when_they_make_no_sense(override, message):
    result = run(
        ["helm", "template", "rlhf", str(CHART), "--kube-version", KUBE_VERSION, *SECRET]
        + ["--set", "judge.enabled=true", *override],
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_the_topics_hook_creates_the_judges_topics(judge_model):
    """The judge publishes AI labels to rlhf.preferences.v1 and unsure pairs to
    rlhf.annotation-queue.v1; both come from the one table the hook's command ensures."""
    job = find(judge_model, "Job", "rlhf-rlhf-platform-topics")
    topics = container(job["spec"]["template"]["spec"], "topics")
    assert topics["command"] == ["python", "-m", "services.cli", "topics", "ensure"]
    names = {t.name for t in TOPICS}
    assert {PREFERENCES, ANNOTATION_QUEUE} <= names
    assert f"{ANNOTATION_QUEUE}.dlq" in names
