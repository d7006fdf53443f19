"""What the chart runs beside the services: the topics hook Job, the policy's autoscaler on its
queue depth, the Prometheus Operator resources (only where the cluster serves their API), the
optional local Kafka, the three example values files, and the values table generated from the
comments of values.yaml. Rendered with the real helm, as in tests/integration/test_helm_chart.py
(whose helpers these use); helm/check.sh validates the same renders with kubeconform.
"""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.integration.test_helm_chart import (
    CHART,
    EXAMPLES,
    OPERATOR,
    PRODUCTION,
    ROOT,
    SECRET,
    container,
    env_of,
    find,
    pod_specs,
    python_containers,
    render,
    run,
    settings_from,
)


@pytest.fixture(scope="module")
def minimal() -> list[dict]:
    return render(*SECRET)


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return render("-f", str(PRODUCTION), *OPERATOR)


def hooks_of(doc: dict) -> tuple[set[str], set[str]]:
    annotations = doc["metadata"].get("annotations", {})
    return (
        set(annotations.get("helm.sh/hook", "").split(",")) - {""},
        set(annotations.get("helm.sh/hook-delete-policy", "").split(",")) - {""},
    )


def test_the_topics_hook_job_runs_the_ensure_command_with_the_services_kafka_env(minimal):
    job = find(minimal, "Job", "rlhf-rlhf-platform-topics")
    assert hooks_of(job) == (
        {"pre-install", "pre-upgrade"},
        {"before-hook-creation", "hook-succeeded"},
    )
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 6
    topics = container(spec, "topics")
    assert topics["command"] == ["python", "-m", "services.cli", "topics", "ensure"]
    rollout = container(pod_specs(minimal)["rlhf-rlhf-platform-rollout"], "worker")
    assert topics["image"] == rollout["image"] == "ghcr.io/rlhf-platform/services:0.1.0"
    kafka_env = {k: v for k, v in env_of(topics).items() if k.startswith("RLHF_KAFKA_")}
    assert kafka_env == {k: v for k, v in env_of(rollout).items() if k.startswith("RLHF_KAFKA_")}
    assert kafka_env["RLHF_KAFKA_BOOTSTRAP_SERVERS"] == "rlhf-kafka-bootstrap.rlhf.svc:9092"
    # The hook runs before the release's ServiceAccount exists: the namespace's default account,
    # with no token.
    assert "serviceAccountName" not in spec and spec["automountServiceAccountToken"] is False
    assert not [d for d in render(*SECRET, "--set", "topics.enabled=false") if d["kind"] == "Job"]


def test_the_hook_command_is_one_the_cli_parses(minimal):
    from services.cli import make_parser

    command = container(pod_specs(minimal)["rlhf-rlhf-platform-topics"], "topics")["command"]
    assert command[:3] == ["python", "-m", "services.cli"]
    options = make_parser().parse_args(command[3:])
    assert (options.stage, options.action) == ("topics", "ensure")
    assert options.bootstrap_servers == ""  # so it reads RLHF_KAFKA_BOOTSTRAP_SERVERS


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--set", "kafka.local.clusterId=short"], "/kafka/local/clusterId"),
        (["--set", "policy.autoscaling.targetCPUUtilizationPercentage=0"], "/policy/autoscaling"),
        (["--set", "policy.autoscaling.queueDepthMetric=rlhf-bad"], "/policy/autoscaling"),
        (["--set", "reward.autoscaling.enabled=true"], "reward"),  # the policy's only
        (["--set", "networkPolicy.kafka.ports[0]=0"], "/networkPolicy/kafka/ports/0"),
        (["--set", "topics.backoffLimit=-1"], "/topics/backoffLimit"),
        (["--set", "prometheusRule.enable=true"], "prometheusRule"),
    ],
)
def test_the_schema_refuses_bad_new_values(override, message):
    result = run(
        ["helm", "template", "rlhf", str(CHART), "--kube-version", "1.33.0", *SECRET, *override],
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_with_the_local_kafka_the_topics_hook_runs_after_install():
    docs = render("-f", str(EXAMPLES["values-cpu-dev"]), *SECRET)
    assert hooks_of(find(docs, "Job", "rlhf-rlhf-platform-topics"))[0] == {
        "post-install",
        "pre-upgrade",
    }


def test_the_topics_job_network_policy_is_a_hook_created_before_it(production):
    policy = find(production, "NetworkPolicy", "rlhf-rlhf-platform-topics")
    annotations = policy["metadata"]["annotations"]
    assert hooks_of(policy) == hooks_of(find(production, "Job", "rlhf-rlhf-platform-topics"))
    assert int(annotations["helm.sh/hook-weight"]) < 0  # before the Job's weight 0
    assert policy["spec"]["ingress"] == []


def test_the_policy_autoscales_on_its_queue_depth_with_cpu_as_fallback(minimal):
    assert not [d for d in minimal if d["kind"] == "HorizontalPodAutoscaler"]
    docs = render("-f", str(EXAMPLES["values-multi-gpu"]), *SECRET)
    hpa = find(docs, "HorizontalPodAutoscaler", "rlhf-rlhf-platform-policy")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "rlhf-rlhf-platform-policy",
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 4)
    pods, cpu = spec["metrics"]
    assert pods == {
        "type": "Pods",
        "pods": {
            "metric": {"name": "rlhf_policy_queue_depth"},
            "target": {"type": "AverageValue", "averageValue": "24"},
        },
    }
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    # The HPA owns the replica count; the metric is one the policy exports.
    assert "replicas" not in find(docs, "Deployment", "rlhf-rlhf-platform-policy")["spec"]
    exported = (ROOT / "services" / "policy" / "metrics.py").read_text()
    assert '"rlhf_policy_queue_depth"' in exported


@pytest.mark.parametrize("values", [[], ["-f", str(PRODUCTION)]])
def test_monitoring_resources_need_the_operator_api_and_their_switch(values):
    switches = ["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true"]
    monitoring = {"ServiceMonitor", "PrometheusRule"}

    def kinds(*args):
        return {d["kind"] for d in render(*SECRET, *values, *args)} & monitoring

    assert kinds(*switches) == set()  # no monitoring.coreos.com/v1: left out, not refused
    assert kinds(*switches, *OPERATOR) == monitoring
    off = ["--set", "serviceMonitor.enabled=false", "--set", "prometheusRule.enabled=false"]
    assert kinds(*off, *OPERATOR) == set()


def test_the_prometheus_rule_and_the_dashboard_are_the_files_in_deploy_monitoring():
    docs = render(*SECRET, *OPERATOR, "--set", "prometheusRule.enabled=true")
    rule = find(docs, "PrometheusRule", "rlhf-rlhf-platform")
    alerts = yaml.safe_load((ROOT / "deploy" / "monitoring" / "alerts.yaml").read_text())
    assert rule["spec"] == alerts
    docs = render(*SECRET, "--set", "grafanaDashboard.enabled=true")
    config_map = find(docs, "ConfigMap", "rlhf-rlhf-platform-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = (ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text()
    assert config_map["data"]["rlhf-platform.json"] == dashboard


def test_the_local_kafka_is_off_by_default_and_the_services_use_it_when_on(minimal):
    assert not [d for d in minimal if d["metadata"]["name"].endswith("-kafka")]
    docs = render("-f", str(EXAMPLES["values-cpu-dev"]), *SECRET)
    broker = find(docs, "StatefulSet", "rlhf-rlhf-platform-kafka")
    assert broker["spec"]["replicas"] == 1
    spec = broker["spec"]["template"]["spec"]
    assert spec["enableServiceLinks"] is False
    kafka = container(spec, "kafka")
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = env_of(kafka)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # the topics hook creates them
    assert env["KAFKA_ADVERTISED_LISTENERS"] == (
        "PLAINTEXT://rlhf-rlhf-platform-kafka-0.rlhf-rlhf-platform-kafka-headless.rlhf.svc:9092"
    )
    assert env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    assert {"name": "data", "mountPath": "/var/lib/kafka/data"} in kafka["volumeMounts"]
    claim = broker["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    service = find(docs, "Service", "rlhf-rlhf-platform-kafka")
    assert service["spec"]["ports"][0]["port"] == 9092
    bootstrap = "rlhf-rlhf-platform-kafka.rlhf.svc:9092"
    for where, _module, env in python_containers(docs):
        assert env["RLHF_KAFKA_BOOTSTRAP_SERVERS"] == bootstrap, where


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_each_example_renders_with_a_locked_down_context_and_its_settings(example, monkeypatch):
    docs = render("-f", str(EXAMPLES[example]))  # each example names the gateway's Secret
    for where, module, env in python_containers(docs):
        settings_from(monkeypatch, module, env)  # every container's settings build
    for name, spec in pod_specs(docs).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["resources"]["limits"], f"{name}/{c['name']}"
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_examples_are_the_three_the_readme_names():
    assert sorted(EXAMPLES) == ["values-cpu-dev", "values-multi-gpu", "values-single-gpu"]
    cpu = render("-f", str(EXAMPLES["values-cpu-dev"]))
    single = render("-f", str(EXAMPLES["values-single-gpu"]))
    multi = render("-f", str(EXAMPLES["values-multi-gpu"]), *OPERATOR)

    def gpus(docs):
        return {
            f"{n}/{c['name']}": {k: v for k, v in c["resources"]["limits"].items() if "gpu" in k}
            for n, spec in pod_specs(docs).items()
            for c in spec["containers"]
            if any("gpu" in k for k in c["resources"]["limits"])
        }

    assert gpus(cpu) == {}
    shared = gpus(single)
    assert set(shared) == {
        "rlhf-rlhf-platform-policy/triton",
        "rlhf-rlhf-platform-reward/triton",
        "rlhf-rlhf-platform-reference/triton",
        "rlhf-rlhf-platform-trainer/trainer",
    }
    assert all(v == {"nvidia.com/gpu.shared": 1} for v in shared.values())
    assert find(multi, "StatefulSet", "rlhf-rlhf-platform-trainer")["spec"]["replicas"] == 2
    assert {d["kind"] for d in multi} >= {"NetworkPolicy", "ServiceMonitor", "PrometheusRule"}


def test_the_values_table_is_current_and_the_check_catches_a_missing_comment(tmp_path):
    script = ROOT / "helm" / "values_table.py"
    current = run([sys.executable, str(script), "--check"], check=False)
    assert current.returncode == 0, current.stderr
    # Self-check on a copy: an uncommented value, then a stale table, are both refused.
    copy = tmp_path / "chart"
    copy.mkdir()
    values = (CHART / "values.yaml").read_text()
    (copy / "README.md").write_text((CHART / "README.md").read_text())
    (copy / "values.yaml").write_text(values + "extra: 1\n")
    missing = run([sys.executable, str(script), "--check", "--chart", str(copy)], check=False)
    assert missing.returncode == 1 and "`extra` has no comment" in missing.stderr
    (copy / "values.yaml").write_text(values + "# -- A new value.\nextra: 1\n")
    stale = run([sys.executable, str(script), "--check", "--chart", str(copy)], check=False)
    assert stale.returncode == 1 and "stale" in stale.stderr
    run([sys.executable, str(script), "--chart", str(copy)])
    assert "| `extra` | `1` | A new value. |" in (copy / "README.md").read_text()
