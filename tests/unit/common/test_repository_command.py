"""`python -m services.<svc> repository` (`ModelService.write_repository`), the Helm chart's init
container, writes a loadable model repository from the service's settings, and refuses to run
without a target folder."""

from __future__ import annotations

import importlib

import pytest


def write_repository(service: str) -> int:
    """What `python -m services.<service> repository` runs, in this process."""
    module = importlib.import_module(f"services.{service}.server")
    return getattr(module, f"{service.title()}Service").write_repository()


@pytest.mark.parametrize(
    "service, model_fixture",
    [("policy", "tiny_lm_dir"), ("reward", "tiny_rm_dir"), ("reference", "tiny_lm_dir")],
)
def test_repository_command_writes_the_model(
    service, model_fixture, request, tmp_path, monkeypatch
):
    prefix = f"RLHF_{service.upper()}_"
    monkeypatch.setenv(prefix + "MODEL_DIR", str(request.getfixturevalue(model_fixture)))
    monkeypatch.setenv(prefix + "MODEL_REPOSITORY", str(tmp_path / "repo"))
    monkeypatch.setenv(prefix + "WEIGHTS_ROOT", str(tmp_path / "weights"))
    assert write_repository(service) == 0
    config = (tmp_path / "repo" / service / "config.pbtxt").read_text()
    assert f'name: "{service}"' in config and 'backend: "python"' in config
    assert "dynamic_batching" in config
    assert (tmp_path / "repo" / service / "1" / "model.py").exists()


@pytest.mark.parametrize("service", ["policy", "reward", "reference"])
@pytest.mark.parametrize(
    "device, dtype, kind", [("gpu", "bfloat16", "KIND_GPU"), ("cpu", "float32", "KIND_CPU")]
)
def test_device_and_dtype_settings_reach_the_triton_model(
    service, device, dtype, kind, tmp_path, monkeypatch
):
    """The Helm chart's init container has no GPU, so the device must come from the settings,
    not from what the writing process sees; the dtype travels as a model parameter."""
    prefix = f"RLHF_{service.upper()}_"
    monkeypatch.setenv(prefix + "MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv(prefix + "MODEL_REPOSITORY", str(tmp_path / "repo"))
    monkeypatch.setenv(prefix + "DEVICE", device)
    monkeypatch.setenv(prefix + "DTYPE", dtype)
    assert write_repository(service) == 0
    config = (tmp_path / "repo" / service / "config.pbtxt").read_text()
    assert f"instance_group [ {{ count: 1 kind: {kind} }} ]" in config
    assert f'parameters {{ key: "dtype" value: {{ string_value: "{dtype}" }} }}' in config


@pytest.mark.parametrize("variable, value", [("DEVICE", "tpu"), ("DTYPE", "float8")])
def test_an_unknown_device_or_dtype_is_refused_at_start(variable, value, tmp_path, monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("RLHF_REWARD_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("RLHF_REWARD_MODEL_REPOSITORY", str(tmp_path / "repo"))
    monkeypatch.setenv(f"RLHF_REWARD_{variable}", value)
    with pytest.raises(ValidationError, match=variable.lower()):
        write_repository("reward")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("service", ["policy", "reward", "reference"])
def test_repository_command_needs_a_target(service, monkeypatch, tmp_path):
    monkeypatch.delenv(f"RLHF_{service.upper()}_MODEL_REPOSITORY", raising=False)
    monkeypatch.setenv(f"RLHF_{service.upper()}_MODEL_DIR", str(tmp_path))
    assert write_repository(service) == 2
