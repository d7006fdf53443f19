"""The skeleton the three model services share (services.common.model_service): one env scheme,
`RLHF_<SVC>_<FIELD>` with the gRPC block at `RLHF_<SVC>_GRPC_<FIELD>` and each service's own
default ports, and one Triton-model spec built from the settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.grpc_server import GrpcSettings
from services.common.model_service import python_model_spec
from services.common.triton_repo import TensorIO, config_pbtxt
from services.policy.settings import PolicySettings
from services.reference.settings import ReferenceSettings
from services.reward.settings import RewardSettings

SERVICES = [
    ("policy", PolicySettings, (50051, 9100)),
    ("reward", RewardSettings, (50052, 9102)),
    ("reference", ReferenceSettings, (50053, 9103)),
]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for key in [k for k in os.environ if k.startswith("RLHF_")]:
        monkeypatch.delenv(key)


@pytest.mark.parametrize("service, settings_type, ports", SERVICES)
def test_every_model_service_reads_its_grpc_block_from_one_scheme(
    service, settings_type, ports, monkeypatch
):
    prefix = f"RLHF_{service.upper()}_"
    monkeypatch.setenv(prefix + "MODEL_DIR", "/models/m")
    assert (settings_type().grpc.port, settings_type().grpc.metrics_port) == ports
    monkeypatch.setenv(prefix + "GRPC_PORT", "6001")
    monkeypatch.setenv(prefix + "GRPC_MAX_CONCURRENT_RPCS", "5")
    monkeypatch.setenv(prefix + "TRITON_QUEUE_DELAY_US", "7")
    loaded = settings_type()
    assert loaded.grpc.port == 6001 and loaded.grpc.max_concurrent_rpcs == 5
    assert loaded.grpc.metrics_port == ports[1]  # the service's default fills what is unset
    assert loaded.triton_queue_delay_us == 7
    # The nested-delimiter spelling the policy once used is not a second scheme.
    monkeypatch.setenv(prefix + "GRPC__PORT", "6002")
    assert settings_type().grpc.port == 6001


def test_a_given_grpc_block_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("RLHF_REWARD_GRPC_PORT", "6001")
    given = GrpcSettings(host="127.0.0.1", port=0, metrics_port=0)
    assert RewardSettings(model_dir="/m", grpc=given).grpc == given


def test_a_bad_grpc_variable_is_refused(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("RLHF_REFERENCE_GRPC_METRICS_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="metrics_port"):
        ReferenceSettings(model_dir="/m")


def test_the_triton_spec_comes_from_the_settings(tmp_path: Path):
    settings = RewardSettings(
        model_dir=tmp_path / "rm",
        triton_model="rm-1",
        triton_max_batch_size=4,
        triton_queue_delay_us=500,
        device="cpu",
        dtype="float32",
    )
    io = (TensorIO("X", "TYPE_FP32", (1,)),)
    spec = python_model_spec(settings, "pkg.mod:Cls", io, io, decoupled=True, version=3)
    assert (spec.name, spec.max_batch_size, spec.max_queue_delay_us) == ("rm-1", 4, 500)
    assert spec.parameters == {"model_dir": str((tmp_path / "rm").resolve()), "version": "3"}
    text = config_pbtxt(spec)
    assert "decoupled: True" in text and "KIND_CPU" in text
    assert 'key: "dtype" value: { string_value: "float32" }' in text
