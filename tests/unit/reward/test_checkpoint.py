"""The checks a new reward-model version must pass: checksums of every file, tensor specs."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from services.common.versions import manifest
from services.reward.checkpoint import (
    CheckpointRefused,
    compare_specs,
    folder_specs,
    read_verified,
    served_specs,
)


@pytest.fixture
def version(tmp_path):
    folder = tmp_path / "v2"
    folder.mkdir()
    save_file(
        {"head.weight": torch.zeros(1, 4), "emb": torch.zeros(10, 4, dtype=torch.bfloat16)},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text("{}")
    return folder


def test_manifest_is_the_sha256_of_every_file(version):
    digests = manifest(version)
    assert set(digests) == {"model.safetensors", "config.json"}
    assert digests["config.json"] == hashlib.sha256(b"{}").hexdigest()
    assert set(read_verified(version, digests)) == set(digests)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m, f: m.update({"config.json": "0" * 64}), "sha256 mismatch for config.json"),
        (lambda m, f: m.pop("config.json"), "files not in the manifest: config.json"),
        (
            lambda m, f: m.update({"tokenizer.json": "0" * 64}),
            "tokenizer.json is listed but missing",
        ),
        (lambda m, f: m.update({"../etc": "0" * 64}), "not a plain file name"),
        (
            lambda m, f: (f / "config.json").write_text('{"x": 1}'),
            "sha256 mismatch for config.json",
        ),
    ],
)
def test_any_checksum_problem_is_refused(version, edit, reason):
    digests = manifest(version)
    edit(digests, version)
    with pytest.raises(CheckpointRefused, match=None) as refused:
        read_verified(version, digests)
    assert reason in str(refused.value)


def test_specs_read_names_shapes_dtypes_without_loading(version):
    data = (version / "model.safetensors").read_bytes()
    specs = folder_specs({"model.safetensors": data, "config.json": b"{}"})
    assert specs == {"head.weight": ((1, 4), "F32"), "emb": ((10, 4), "BF16")}
    assert served_specs(version) == specs


def test_a_tensor_in_two_shards_or_a_broken_header_is_refused(version):
    data = (version / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointRefused, match="tensor .* appears in more than one file"):
        folder_specs({"a.safetensors": data, "b.safetensors": data})
    with pytest.raises(CheckpointRefused, match="b.safetensors: unreadable safetensors header"):
        folder_specs({"a.safetensors": data, "b.safetensors": data[:8] + b"x" * (len(data) - 8)})


def test_compare_specs_names_each_difference():
    served = {"a": ((2, 3), "F32"), "b": ((4,), "F32"), "c": ((1,), "F32")}
    compare_specs(served, dict(served))
    new = {"a": ((2, 4), "F32"), "b": ((4,), "BF16"), "d": ((1,), "F32")}
    with pytest.raises(CheckpointRefused) as refused:
        compare_specs(served, new, limit=10)
    reason = str(refused.value)
    for part in [
        "missing tensor c",
        "unexpected tensor d",
        "tensor a has shape [2, 4], expected [2, 3]",
        "tensor b has dtype BF16, expected F32",
    ]:
        assert part in reason


def test_a_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointRefused, match="no .safetensors weights"):
        folder_specs({"config.json": b"{}"})
