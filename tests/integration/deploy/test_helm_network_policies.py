"""The chart's NetworkPolicies admit exactly the flows of the design, in both directions.

The rendered policies are evaluated the way Kubernetes does: a connection from pod A to pod B on
a port is allowed when A's egress allows it (or no policy of A's has Egress) and B's ingress
allows it (or no policy of B's has Ingress). Each design flow must be allowed, and flows the
design does not have (gateway -> reward, reward -> Kafka, ...) must be refused; gateway ->
reward is admitted only when the gateway ranks best_of samples (gateway.bestOf.enabled), and the
judge -> policy only when the judge asks the policy (judge.throughPolicy). One test also
reads the rules themselves (selectors, ports, direction), and the evaluator is checked against
hand-made policies first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.integration.test_helm_chart import (
    CHART,
    EXAMPLES,
    JUDGE_MODEL,
    KUBE_VERSION,
    PRODUCTION,
    SECRET,
    container,
    env_of,
    find,
    pod_specs,
    render,
    run,
)

NAMESPACE = "rlhf"
PREFIX = "rlhf-rlhf-platform-"
COMPONENTS = ("policy", "reward", "reference", "rollout", "trainer", "gateway", "curator")
COMPONENTS += ("refresh", "topics")
KAFKA_CLIENTS = ("policy", "gateway", "rollout", "trainer", "curator", "refresh", "topics")
GRPC = 50051


@dataclass(frozen=True)
class Endpoint:
    """A pod (labels, namespace) or an address outside the cluster (external)."""

    name: str
    labels: dict = field(default_factory=dict, hash=False)
    namespace: str = NAMESPACE
    external: bool = False


def pod(component: str) -> Endpoint:
    return Endpoint(
        component,
        {
            "app.kubernetes.io/name": "rlhf-platform",
            "app.kubernetes.io/instance": "rlhf",
            "app.kubernetes.io/component": component,
        },
    )


DNS = Endpoint("dns", {"k8s-app": "kube-dns"}, "kube-system")
PROMETHEUS = Endpoint("prometheus", {"app.kubernetes.io/name": "prometheus"}, "monitoring")
INGRESS = Endpoint("ingress-nginx", {"app": "ingress-nginx"}, "ingress-nginx")
OTHER_NAMESPACE = Endpoint("intruder", {"app.kubernetes.io/component": "gateway"}, "other")
INTERNET = Endpoint("internet", external=True)
EXTERNAL_KAFKA = Endpoint("kafka-0.kafka.data.svc", external=True)


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"evaluator knows matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def peer_matches(peer: dict, other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return other.external  # no CIDR arithmetic needed here: the chart renders none
    if other.external:
        return False
    if "namespaceSelector" in peer:
        ns_labels = {"kubernetes.io/metadata.name": other.namespace}
        if not selects(peer["namespaceSelector"], ns_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], other.labels)


def rule_admits(rule: dict, peers_key: str, other: Endpoint, port: int, protocol: str) -> bool:
    peers = rule.get(peers_key) or []
    if peers and not any(peer_matches(p, other, NAMESPACE) for p in peers):
        return False
    ports = rule.get("ports") or []
    return not ports or any(
        p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports
    )


def side_allows(policies, me: Endpoint, other, port, protocol, direction: str) -> bool:
    if me.external or me.namespace != NAMESPACE:
        return True  # not ours: no policy of the release applies
    mine = [
        p
        for p in policies
        if selects(p["spec"]["podSelector"], me.labels) and direction in p["spec"]["policyTypes"]
    ]
    if not mine:
        return True
    key, peers = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    return any(
        rule_admits(rule, peers, other, port, protocol) for p in mine for rule in p["spec"][key]
    )


def allowed(policies, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    return side_allows(policies, src, dst, port, protocol, "Egress") and side_allows(
        policies, dst, src, port, protocol, "Ingress"
    )


def policies_of(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "NetworkPolicy"]


def test_the_evaluator_itself():
    none: list[dict] = []
    assert allowed(none, pod("gateway"), pod("reward"), GRPC)
    deny_all = [
        {
            "spec": {
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [],
                "egress": [],
            }
        }
    ]
    assert not allowed(deny_all, pod("gateway"), pod("reward"), GRPC)
    reward_from_rollout = deny_all + [
        {
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "reward"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [
                            {"podSelector": {"matchLabels": pod("rollout").labels}},
                        ],
                        "ports": [{"port": GRPC, "protocol": "TCP"}],
                    }
                ],
            }
        },
        {
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "rollout"}},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": {}}]}],
            }
        },
    ]
    assert allowed(reward_from_rollout, pod("rollout"), pod("reward"), GRPC)
    assert not allowed(reward_from_rollout, pod("rollout"), pod("reward"), GRPC + 1)
    assert not allowed(reward_from_rollout, pod("gateway"), pod("reward"), GRPC)
    assert not allowed(reward_from_rollout, pod("rollout"), pod("reward"), GRPC, "UDP")


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return policies_of(render("-f", str(PRODUCTION)))


@pytest.fixture(scope="module")
def dev_cluster() -> list[dict]:
    """The CPU example with its local Kafka, fenced, metrics open to anyone."""
    return policies_of(
        render(
            "-f", str(EXAMPLES["values-cpu-dev"]), *SECRET, "--set", "networkPolicy.enabled=true"
        )
    )


# (source, destination, port, protocol): the design's flows.
DESIGN_GRPC = [
    ("gateway", "policy"),
    ("trainer", "policy"),
    ("rollout", "policy"),
    ("rollout", "reward"),
    ("rollout", "reference"),
    ("refresh", "reward"),
]
NOT_IN_THE_DESIGN = [
    ("gateway", "reward"),
    ("gateway", "reference"),
    ("curator", "policy"),
    ("refresh", "policy"),
    ("refresh", "reference"),
    ("trainer", "reward"),
    ("topics", "policy"),
    ("policy", "reward"),
    ("reward", "policy"),
    ("reference", "reward"),
]


def test_every_pod_has_a_policy_for_both_directions(production, dev_cluster):
    for policies, extra in ((production, ()), (dev_cluster, ("kafka",))):
        names = {p["metadata"]["name"] for p in policies}
        assert names == {PREFIX + c for c in COMPONENTS + extra}
        for p in policies:
            assert p["spec"]["policyTypes"] == ["Ingress", "Egress"], p["metadata"]["name"]


def test_the_design_grpc_flows_are_admitted_and_no_other(production, dev_cluster):
    for policies in (production, dev_cluster):
        for src, dst in DESIGN_GRPC:
            assert allowed(policies, pod(src), pod(dst), GRPC), f"{src} -> {dst}"
            assert not allowed(policies, pod(src), pod(dst), GRPC + 1), f"{src} -> {dst}:other"
        for src, dst in NOT_IN_THE_DESIGN:
            assert not allowed(policies, pod(src), pod(dst), GRPC), f"{src} -> {dst} admitted"
        # A pod of another namespace wearing the gateway's component label is not the gateway.
        assert not allowed(policies, OTHER_NAMESPACE, pod("policy"), GRPC)


def test_best_of_admits_gateway_to_reward_and_nothing_more():
    docs = render("-f", str(PRODUCTION), "--set", "gateway.bestOf.enabled=true")
    policies = policies_of(docs)
    assert allowed(policies, pod("gateway"), pod("reward"), GRPC)
    assert not allowed(policies, pod("gateway"), pod("reward"), GRPC + 1)
    for src, dst in DESIGN_GRPC:
        assert allowed(policies, pod(src), pod(dst), GRPC), f"{src} -> {dst}"
    for src, dst in NOT_IN_THE_DESIGN:
        if (src, dst) != ("gateway", "reward"):
            assert not allowed(policies, pod(src), pod(dst), GRPC), f"{src} -> {dst} admitted"
    gateway = container(pod_specs(docs)[PREFIX + "gateway"], "gateway")
    assert env_of(gateway)["RLHF_GATEWAY_REWARD_URL"] == (
        f"{PREFIX}reward-headless.{NAMESPACE}.svc.cluster.local:{GRPC}"
    )


def test_best_of_is_off_by_default_and_needs_the_reward_service(production):
    docs = render("-f", str(PRODUCTION))
    gateway = container(pod_specs(docs)[PREFIX + "gateway"], "gateway")
    assert "RLHF_GATEWAY_REWARD_URL" not in env_of(gateway)
    assert not allowed(production, pod("gateway"), pod("reward"), GRPC)
    failed = run(
        ["helm", "template", "rlhf", str(CHART), "--kube-version", KUBE_VERSION]
        + ["-f", str(PRODUCTION), "--set", "gateway.bestOf.enabled=true"]
        + ["--set", "reward.enabled=false"],
        check=False,
    )
    assert failed.returncode != 0 and "reward.enabled=true" in failed.stderr


def test_only_the_trainer_reaches_the_weight_push_side_channel(production, dev_cluster):
    docs = render("-f", str(PRODUCTION))
    service = container(pod_specs(docs)[PREFIX + "policy"], "service")
    port = int(env_of(service)["RLHF_POLICY_WEIGHTS_SIDE_CHANNEL_PORT"])
    assert {"name": "weights-push", "containerPort": port, "protocol": "TCP"} in service["ports"]
    for policies in (production, dev_cluster):
        assert allowed(policies, pod("trainer"), pod("policy"), port)
        for stranger in (pod("gateway"), pod("rollout"), pod("refresh"), OTHER_NAMESPACE):
            assert not allowed(policies, stranger, pod("policy"), port)
        assert not allowed(policies, pod("trainer"), pod("reward"), port)


def test_trainer_ranks_reach_each_other_on_any_port_and_nobody_else_does(production):
    for port in (29500, 41234):  # the rendezvous, and a port NCCL or gloo picked
        assert allowed(production, pod("trainer"), pod("trainer"), port)
        assert not allowed(production, pod("rollout"), pod("trainer"), port)


def test_kafka_clients_reach_the_brokers_and_nothing_else_does(production, dev_cluster):
    # External brokers (production): any address on the bootstrap port, for the clients only.
    for component in KAFKA_CLIENTS:
        assert allowed(production, pod(component), EXTERNAL_KAFKA, 9092), component
        assert not allowed(production, pod(component), INTERNET, 443), component
    for component in ("reward", "reference"):  # they use no Kafka
        assert not allowed(production, pod(component), EXTERNAL_KAFKA, 9092), component
    # The local broker: its clients in, nobody else.
    kafka = pod("kafka")
    for component in KAFKA_CLIENTS:
        assert allowed(dev_cluster, pod(component), kafka, 9092), component
    for stranger in (pod("reward"), pod("reference"), OTHER_NAMESPACE, PROMETHEUS):
        assert not allowed(dev_cluster, stranger, kafka, 9092), stranger.name
    assert not allowed(dev_cluster, pod("gateway"), kafka, 9093)  # the controller listener


def test_every_pod_resolves_names_and_nothing_more_leaves_the_cluster(production):
    for component in COMPONENTS:
        assert allowed(production, pod(component), DNS, 53, "UDP"), component
        assert allowed(production, pod(component), DNS, 53, "TCP"), component
        assert not allowed(production, pod(component), INTERNET, 53, "UDP"), component
        assert not allowed(production, pod(component), INTERNET, 443), component


def test_prometheus_scrapes_the_metrics_ports_only_from_metrics_from(production):
    metrics = {"policy": (9090, 8002), "reward": (9090, 8002), "reference": (9090, 8002)}
    metrics |= {c: (9090,) for c in ("rollout", "trainer", "curator", "refresh")}
    metrics["gateway"] = (8080,)  # /metrics on its HTTP port
    for component, ports in metrics.items():
        for port in ports:
            assert allowed(production, PROMETHEUS, pod(component), port), (component, port)
            assert not allowed(production, OTHER_NAMESPACE, pod(component), port), component
        assert not allowed(production, PROMETHEUS, pod(component), GRPC), component
    assert not allowed(production, PROMETHEUS, pod("topics"), 9090)


def test_the_gateway_takes_users_only_from_ingress_from(production):
    assert allowed(production, INGRESS, pod("gateway"), 8080)
    assert not allowed(production, INTERNET, pod("gateway"), 8080)
    open_gateway = policies_of(
        render("-f", str(PRODUCTION), "--set", "networkPolicy.ingressFrom=null")
    )
    assert allowed(open_gateway, INTERNET, pod("gateway"), 8080)  # empty: everyone


def test_the_rules_name_the_callers_and_ports_themselves(production):
    """The reward's policy, read directly: gRPC from the rollout and the refresh by pod selector,
    metrics from the monitoring namespace, and no egress but DNS."""
    reward = find(production, "NetworkPolicy", PREFIX + "reward")["spec"]
    assert reward["podSelector"]["matchLabels"] == pod("reward").labels
    callers = [
        (
            rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
            rule["ports"],
        )
        for rule in reward["ingress"]
        if "podSelector" in rule["from"][0]
    ]
    grpc = [{"port": GRPC, "protocol": "TCP"}]
    assert callers == [("rollout", grpc), ("refresh", grpc)]
    scrape = [rule for rule in reward["ingress"] if "namespaceSelector" in rule["from"][0]]
    assert scrape == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
            "ports": [{"port": 9090, "protocol": "TCP"}, {"port": 8002, "protocol": "TCP"}],
        }
    ]
    assert [rule["ports"] for rule in reward["egress"]] == [
        [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    ]
    rollout = find(production, "NetworkPolicy", PREFIX + "rollout")["spec"]
    targets = [
        rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for rule in rollout["egress"]
        if rule.get("to")
        and "podSelector" in rule["to"][0]
        and "namespaceSelector" not in rule["to"][0]
    ]
    assert targets == ["policy", "reward", "reference"]


def test_strimzi_brokers_are_selected_by_their_cluster_label():
    policies = policies_of(
        render(
            "-f",
            str(EXAMPLES["values-multi-gpu"]),
            "--set",
            "kafka.strimzi.namespace=kafka",
        )
    )
    broker = Endpoint(
        "rlhf-kafka-0", {"strimzi.io/cluster": "rlhf", "strimzi.io/kind": "Kafka"}, "kafka"
    )
    other_cluster = Endpoint(
        "other-kafka-0", {"strimzi.io/cluster": "other", "strimzi.io/kind": "Kafka"}, "kafka"
    )
    assert allowed(policies, pod("curator"), broker, 9092)
    assert not allowed(policies, pod("curator"), other_cluster, 9092)
    assert not allowed(policies, pod("curator"), EXTERNAL_KAFKA, 9092)


# The judge (judge.enabled): its callers are people and jobs outside the release (`rlhf label-ai
# --judge`, `rlhf eval --judge`), admitted by networkPolicy.judgeIngressFrom.
LABELLER = Endpoint("label-ai", {"app": "rlhf-label-ai"})
STRANGER = Endpoint("stranger", {"app": "curl"})
LABELLERS = [
    "--set-json",
    'networkPolicy.judgeIngressFrom=[{"podSelector": {"matchLabels": {"app": "rlhf-label-ai"}}}]',
]
THROUGH_POLICY = ["--set", "judge.enabled=true,judge.throughPolicy=true"]


@pytest.fixture(scope="module")
def judge_model() -> list[dict]:
    """Production with the judge of its own model, reachable by the labelling jobs only."""
    return policies_of(render("-f", str(PRODUCTION), *JUDGE_MODEL, *LABELLERS))


@pytest.fixture(scope="module")
def judge_policy() -> list[dict]:
    """Production with the judge through the policy, open to every caller (the default)."""
    return policies_of(render("-f", str(PRODUCTION), *THROUGH_POLICY))


def test_the_judge_has_a_policy_and_reaches_kafka(judge_model, judge_policy):
    for policies in (judge_model, judge_policy):
        names = {p["metadata"]["name"] for p in policies}
        assert names == {PREFIX + c for c in COMPONENTS + ("judge",)}
        judge = find(policies, "NetworkPolicy", PREFIX + "judge")["spec"]
        assert judge["policyTypes"] == ["Ingress", "Egress"]
        assert allowed(policies, pod("judge"), EXTERNAL_KAFKA, 9092)  # AI labels, unsure pairs
        assert not allowed(policies, pod("judge"), INTERNET, 443)
        assert allowed(policies, pod("judge"), DNS, 53, "UDP")
    # The local broker admits the judge among its clients.
    dev = policies_of(
        render(
            "-f",
            str(EXAMPLES["values-cpu-dev"]),
            *SECRET,
            *THROUGH_POLICY,
            "--set",
            "networkPolicy.enabled=true",
        )
    )
    assert allowed(dev, pod("judge"), pod("kafka"), 9092)
    assert not allowed(dev, pod("judge"), pod("kafka"), 9093)
    assert allowed(dev, pod("judge"), pod("policy"), GRPC)


def test_the_judge_reaches_the_policy_only_when_it_judges_through_it(judge_model, judge_policy):
    assert allowed(judge_policy, pod("judge"), pod("policy"), GRPC)
    assert not allowed(judge_policy, pod("judge"), pod("policy"), GRPC + 1)
    assert not allowed(judge_model, pod("judge"), pod("policy"), GRPC)  # its own model
    for policies in (judge_model, judge_policy):
        for other in ("reward", "reference", "trainer"):
            assert not allowed(policies, pod("judge"), pod(other), GRPC), other
        # Nothing else in the design changed.
        for src, dst in DESIGN_GRPC:
            assert allowed(policies, pod(src), pod(dst), GRPC), f"{src} -> {dst}"
        for src, dst in NOT_IN_THE_DESIGN:
            assert not allowed(policies, pod(src), pod(dst), GRPC), f"{src} -> {dst} admitted"
        # No pod of the release calls the judge: its callers are outside it.
        for src in ("gateway", "rollout", "trainer", "reward"):
            assert not allowed(policies, pod(src), pod("judge"), GRPC), src


def test_the_judge_takes_callers_only_from_judge_ingress_from(judge_model, judge_policy):
    assert allowed(judge_model, LABELLER, pod("judge"), GRPC)
    assert not allowed(judge_model, LABELLER, pod("judge"), 8001)  # Triton's gRPC: loopback only
    for stranger in (STRANGER, INTERNET, OTHER_NAMESPACE):
        assert not allowed(judge_model, stranger, pod("judge"), GRPC), stranger.name
    # Empty (the default): everyone reaches its gRPC port, and only that port.
    for caller in (LABELLER, STRANGER, INTERNET):
        assert allowed(judge_policy, caller, pod("judge"), GRPC), caller.name
    assert not allowed(judge_policy, STRANGER, pod("judge"), 9090)  # metrics: metricsFrom


def test_prometheus_scrapes_the_judge_and_its_triton_only_where_it_runs(judge_model, judge_policy):
    for port in (9090, 8002):
        assert allowed(judge_model, PROMETHEUS, pod("judge"), port), port
        assert not allowed(judge_model, OTHER_NAMESPACE, pod("judge"), port), port
    assert allowed(judge_policy, PROMETHEUS, pod("judge"), 9090)
    assert not allowed(judge_policy, PROMETHEUS, pod("judge"), 8002)  # no Triton in its pod


def test_the_judge_reaches_another_policy_service_on_its_port_only():
    policies = policies_of(
        render(
            "-f", str(PRODUCTION), "--set", "judge.enabled=true,judge.policyAddress=policy.ml:50099"
        )
    )
    other_policy = Endpoint("policy.ml", external=True)
    assert allowed(policies, pod("judge"), other_policy, 50099)
    assert not allowed(policies, pod("judge"), other_policy, 443)
    assert not allowed(policies, pod("judge"), pod("policy"), GRPC)  # not this release's
