"""The Triton metrics the dashboard and the alert rules query (`nv_*`) are ones the real Triton
server exports: a model is loaded and run once, then its /metrics endpoint is read.
(tests/unit/deploy/test_monitoring.py checks the platform's own `rlhf_*` names.)"""

from __future__ import annotations

import json
import re
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import yaml

from deploy.local.probe_model import IN_FEATURES, probe_spec, save_probe
from services.common.triton_repo import write_model
from tests.unit.deploy.test_monitoring import (
    ALERTS,
    DASHBOARD,
    dashboard_queries,
    metric_names,
    rule_queries,
)

GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage"}
"""Exported by a Triton that sees a GPU; none is on this machine."""


def test_every_triton_metric_queried_is_exported_by_triton(triton_server, run_dir):
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    queries += rule_queries(yaml.safe_load(ALERTS.read_text()))
    queried = {name for expr in queries for name in metric_names(expr) if name.startswith("nv_")}
    assert {"nv_inference_pending_request_count", "nv_inference_queue_duration_us"} <= queried

    weights = run_dir / "probe.safetensors"
    save_probe(weights, seed=5)
    write_model(triton_server.model_repository, probe_spec(weights))
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        client.load_model("probe")
        request = grpcclient.InferInput("INPUT", [2, IN_FEATURES], "FP32")
        request.set_data_from_numpy(np.zeros((2, IN_FEATURES), dtype=np.float32))
        client.infer("probe", [request])
        text = urllib.request.urlopen(triton_server.metrics_url, timeout=10).read().decode()
    finally:
        client.unload_model("probe")
        client.close()
    exported = set(re.findall(r"^# TYPE (\w+) ", text, re.MULTILINE))
    assert "nv_inference_count" in exported, text[:2000]
    assert queried - GPU_ONLY <= exported, queried - exported
    # The model's series carry the `model` label the dashboard groups by.
    assert re.search(r'^nv_inference_exec_count\{[^}]*model="probe"', text, re.MULTILINE)
