"""deploy/monitoring: the Grafana dashboard and the Prometheus alert rules show what the issue
asks for, and every metric they query is one a service exports.

Metric names are read from the PromQL of every panel target, template variable and rule (a small
tokenizer: label matchers, ranges, strings, grouping clauses and function names are not metric
names), then checked against the names the services register with prometheus_client, read from
their source (`Counter("rlhf_...")`, a module constant, an f-string on a model service's name,
or the two classes that build names at run time, instantiated here; any other dynamic name
fails the test until it is expanded here). A histogram's `_bucket`/`_sum`/`_count` series map to its name;
Triton's own `nv_*` metrics are Triton's (tests/integration/deploy/test_triton_metrics.py checks
them against the real server). The check fails on a made-up name (the self-check below).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[3]
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yaml"
CHART_FILES = ROOT / "helm" / "rlhf-platform" / "files"

PENDING: dict[str, str] = {}
"""Metrics the dashboard or the rules query that other work will add. Each is excused only while
no service exports it; once one does, it is checked like every other name."""

PROMETHEUS_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
FAMILY_TYPES = {"GaugeMetricFamily", "CounterMetricFamily", "HistogramMetricFamily"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan", "start", "end"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_quantile", "histogram_avg", "histogram_count", "histogram_sum",
    "histogram_fraction", "holt_winters", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp",
    "vector", "year", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "quantile_over_time", "stddev_over_time", "stdvar_over_time",
    "last_over_time", "present_over_time",
}  # fmt: skip
TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      | (?P<braces>\{[^{}]*\})
      | (?P<range>\[[^\[\]]*\])
      | (?P<variable>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
      | (?P<number>(?:\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?:ms|[smhdwy])?)
      | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<open>\()
      | (?P<close>\))
      | (?P<other>\S)""",
    re.VERBOSE,
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    tokens = [
        (m.lastgroup, m.group())
        for m in TOKEN.finditer(expr)
        if m.lastgroup not in ("string", "braces", "range", "variable", "number")
    ]
    names, i = set(), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][0] if i + 1 < len(tokens) else None
        after = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "name" and text in FUNCTIONS and after in ("by", "without"):
            pass  # `sum by (...) (...)`: the aggregation, its clause is skipped next
        elif kind == "name" and text in GROUPING and following == "open":
            depth, i = 0, i + 1
            while i < len(tokens):  # skip the label list
                depth += {"open": 1, "close": -1}.get(tokens[i][0], 0)
                if depth == 0:
                    break
                i += 1
        elif kind == "name" and following == "open":
            assert text in FUNCTIONS, f"unknown PromQL function {text!r} in {expr!r}"
        elif kind == "name" and text not in KEYWORDS:
            names.add(text)
        i += 1
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            out += [t["expr"] for t in inner.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            out.append(match.group(1) if match else query)
    return out


def rule_queries(rules: dict) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _constants(tree: ast.Module) -> dict[str, str]:
    return {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name) and isinstance(node.value.value, str)
    }


def model_services() -> set[str]:
    """The `name` of every ModelService subclass (policy, reward, reference): metric prefixes."""
    names = set()
    for path in (ROOT / "services").glob("*/server.py"):
        names |= set(re.findall(r'^\s+name = "(\w+)"', path.read_text(), re.MULTILINE))
    assert {"policy", "reward", "reference"} <= names
    return names


def per_service_names(node: ast.JoinedStr) -> list[str] | None:
    """An f-string whose every placeholder is a service's name (`f"rlhf_{service.name}_x"`),
    expanded for each model service; None for any other f-string."""
    parts = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(value.value)
        elif re.fullmatch(r"(\w+\.)+name", ast.unparse(value.value)):  # service.name
            parts.append(None)
        else:
            return None
    return [
        "".join(part if part is not None else service for part in parts)
        for service in sorted(model_services())
    ]


def registered_in_source() -> tuple[dict[str, str], list[str]]:
    """(name -> type) of every metric services/** define with a literal or constant name, or
    with a service's name in an f-string, and the places (file:line) that build a name at run
    time some other way."""
    names, dynamic = {}, []
    for path in sorted((ROOT / "services").rglob("*.py")):
        if "genproto" in path.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        imported = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus")
            for alias in node.names
        }
        constants = _constants(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func.id if isinstance(node.func, ast.Name) else None
            if func not in imported or func not in PROMETHEUS_TYPES | FAMILY_TYPES:
                continue
            first = node.args[0]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names[first.value] = func
            elif isinstance(first, ast.Name) and first.id in constants:
                names[constants[first.id]] = func
            elif isinstance(first, ast.JoinedStr) and per_service_names(first):
                names |= dict.fromkeys(per_service_names(first), func)
            else:
                dynamic.append(where)
    return names, dynamic


def registered_at_run_time() -> set[str]:
    """Names the two dynamic definitions produce: the gRPC metrics of each model service and the
    trainer's learner gauges, built by instantiating the classes on a scratch registry."""
    from services.common.metrics import RpcMetrics
    from services.trainer.metrics import TrainerMetrics

    registry = CollectorRegistry()
    for service in sorted(model_services()):
        RpcMetrics(service, registry)
    families = [*registry.collect(), *TrainerMetrics().registry.collect()]
    return set().union(*(series_of(f.name, f.type) for f in families))


def series_of(name: str, kind: str) -> set[str]:
    """The series names a metric of this name and type exposes."""
    kind = kind.lower().removesuffix("metricfamily")
    if kind == "counter":
        return {name if name.endswith("_total") else f"{name}_total"}
    if kind == "histogram":
        return {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "summary":
        return {name, f"{name}_sum", f"{name}_count"}
    return {name}


DYNAMIC_DEFINITIONS = {"services/common/metrics.py", "services/trainer/metrics.py"}


def exported_names() -> set[str]:
    """Every series name a service exposes: counters with `_total`, histograms with their
    `_bucket`/`_sum`/`_count`."""
    names, dynamic = registered_in_source()
    unexpanded = {where.split(":")[0] for where in dynamic} - DYNAMIC_DEFINITIONS
    assert not unexpanded, f"metric names built at run time here: {unexpanded}; expand them"
    series = set().union(*(series_of(name, kind) for name, kind in names.items()))
    return series | registered_at_run_time()


def unexported(queried: set[str], exported: set[str]) -> set[str]:
    return {n for n in queried if n not in exported and not n.startswith("nv_")}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def rules() -> dict:
    return yaml.safe_load(ALERTS.read_text())


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_names()


def test_the_tokenizer_reads_metric_names_only():
    expr = (
        "sum by (group, topic) (max by (group, topic, partition) (rlhf_kafka_consumer_lag"
        '{namespace=~"$namespace", topic!="x"})) > 10000 and on (namespace) '
        "histogram_quantile(0.95, sum by (le) (rate(rlhf_policy_request_duration_seconds_bucket"
        "[$__rate_interval] offset 5m))) / ignoring(pod) group_left(model) nv_inference_count"
    )
    assert metric_names(expr) == {
        "rlhf_kafka_consumer_lag",
        "rlhf_policy_request_duration_seconds_bucket",
        "nv_inference_count",
    }
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        metric_names("rtae(rlhf_policy_generated_tokens_total[5m])")


def test_the_exported_names_come_from_the_services(exported):
    # A literal name, a histogram's series, a counter's, a constant (the consumer lag), the
    # dynamic gRPC metrics and learner gauges, and the gateway's feedback by rating.
    assert {
        "rlhf_policy_queue_depth",
        "rlhf_policy_request_duration_seconds_bucket",
        "rlhf_trainer_weights_push_failures_total",
        "rlhf_kafka_consumer_lag",
        "rlhf_reward_requests_total",
        "rlhf_trainer_kl",
        "rlhf_gateway_feedback_total",
    } <= exported


def test_the_check_fails_on_a_made_up_name(exported):
    queried = metric_names("sum(rate(rlhf_policy_made_up_total[5m])) + rlhf_policy_queue_depth")
    assert unexported(queried, exported) == {"rlhf_policy_made_up_total"}
    # A suffix on a metric that is not a histogram is no way round it.
    assert unexported({"rlhf_policy_queue_depth_bucket"}, exported) == {
        "rlhf_policy_queue_depth_bucket"
    }


def test_every_metric_the_dashboard_and_the_rules_query_is_exported(dashboard, rules, exported):
    queried = set()
    for expr in dashboard_queries(dashboard) + rule_queries(rules):
        queried |= metric_names(expr)
    missing = unexported(queried, exported)
    pending = {name for name in missing if name in PENDING}
    assert missing - pending == set(), f"queried but exported by no service: {missing - pending}"
    assert len(queried) > 25


def test_the_dashboard_shows_what_the_loop_needs(dashboard):
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    by_title = {p["title"]: p for p in panels}
    wanted = {
        "Generation throughput": {"rlhf_policy_generated_tokens_total"},
        "Generation latency": {"rlhf_policy_request_duration_seconds_bucket"},
        "Triton queue": {"nv_inference_pending_request_count", "nv_inference_queue_duration_us"},
        "Triton batch size": {"nv_inference_count", "nv_inference_exec_count"},
        "Rollouts produced, consumed, dropped": {
            "rlhf_rollout_rollouts_total",
            "rlhf_trainer_rollouts_consumed_total",
            "rlhf_trainer_rollouts_dropped_total",
        },
        "Consumer lag per group": {"rlhf_kafka_consumer_lag"},
        "Reward and gold score": {"rlhf_trainer_reward_mean", "rlhf_rollout_gold_mean"},
        "KL to the reference": {"rlhf_trainer_kl"},
        "Weights version per replica": {
            "rlhf_policy_weights_version",
            "rlhf_trainer_weights_version",
        },
        "Feedback rate by rating": {"rlhf_gateway_feedback_total"},
        "Reward-model accuracy": {"rlhf_refresh_held_out_accuracy"},
    }
    for title, metrics in wanted.items():
        assert title in by_title, title
        queried = set().union(*(metric_names(t["expr"]) for t in by_title[title]["targets"]))
        assert metrics <= queried, (title, metrics - queried)
    lag = by_title["Consumer lag per group"]["targets"][0]["expr"]
    assert "by (group, topic)" in lag
    assert "by (rating)" in by_title["Feedback rate by rating"]["targets"][0]["expr"]
    assert "by (pod)" in by_title["Weights version per replica"]["targets"][0]["expr"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["description"] and panel["targets"], panel["title"]


def test_the_alerts_cover_lag_pushes_refreshes_dead_letters_and_replicas(rules):
    alerts = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    uses = {name: metric_names(rule["expr"]) for name, rule in alerts.items()}
    wanted = {
        "RLHFConsumerLagHigh": {"rlhf_kafka_consumer_lag"},
        "RLHFWeightsPushFailing": {"rlhf_trainer_weights_push_failures_total"},
        "RLHFRewardRefreshRejected": {"rlhf_refresh_refreshes_rejected_total"},
        "RLHFRewardReloadRefused": {"rlhf_refresh_reloads_total"},
        "RLHFDeadLettersGrowing": {"rlhf_dlq_records_total"},
        "RLHFPolicyReplicaBehind": {"rlhf_trainer_weights_version", "rlhf_policy_weights_version"},
    }
    assert {name: uses[name] for name in wanted} == wanted
    behind = alerts["RLHFPolicyReplicaBehind"]["expr"]
    assert "group_right" in behind and behind.strip().endswith("> 0")


def test_the_chart_ships_the_same_files():
    for name in ("alerts.yaml", "grafana-dashboard.json"):
        assert (CHART_FILES / name).read_bytes() == (MONITORING / name).read_bytes(), (
            f"helm/rlhf-platform/files/{name} differs: cp deploy/monitoring/{name} "
            "helm/rlhf-platform/files/"
        )
