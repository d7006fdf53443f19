"""`load_into`: the swap's copy of a pushed safetensors set into the served parameters."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from services.policy.triton_model import load_into


class Tied(torch.nn.Module):
    """An embedding tied to an output head, a float32 layer and a bfloat16 bias."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3, dtype=dtype)
        self.head = torch.nn.Linear(3, 5, bias=False, dtype=dtype)
        self.head.weight = self.embed.weight
        self.layer = torch.nn.Linear(3, 3, dtype=dtype)
        self.extra = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))


def trained(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(5, 3, generator=g),
        "layer.weight": torch.randn(3, 3, generator=g),
        "layer.bias": torch.randn(3, generator=g),
        "extra": torch.randn(4, generator=g).to(torch.bfloat16),
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_copies_every_tensor_exactly_and_tied_weights_follow(tmp_path):
    tensors = trained(1)
    save_file({k: tensors[k] for k in ("embed.weight", "extra")}, str(tmp_path / "a.safetensors"))
    save_file(
        {k: tensors[k] for k in ("layer.weight", "layer.bias")}, str(tmp_path / "b.safetensors")
    )
    model = Tied()
    load_into(model, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    for name, value in tensors.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(model.head.weight, tensors["embed.weight"])
    assert model.extra.dtype == torch.bfloat16


def test_a_model_served_in_another_dtype_gets_the_cast_values(tmp_path):
    tensors = trained(2)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    model = Tied(dtype=torch.bfloat16)
    load_into(model, [tmp_path / "m.safetensors"])
    assert model.layer.weight.dtype == torch.bfloat16
    assert torch.equal(model.layer.weight, tensors["layer.weight"].to(torch.bfloat16))
    assert torch.equal(model.head.weight, tensors["embed.weight"].to(torch.bfloat16))


def write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "case",
    ["offsets too short", "past the file end", "wrong shape", "unknown dtype", "unknown tensor"],
)
def test_a_malformed_file_is_refused_before_any_parameter_changes(tmp_path, case):
    good = trained(3)
    save_file(good, str(tmp_path / "good.safetensors"))
    entry = {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
    name = "layer.bias"
    if case == "offsets too short":
        entry["data_offsets"] = [0, 8]
    elif case == "past the file end":
        entry["data_offsets"] = [4, 16]
    elif case == "wrong shape":
        entry["shape"], entry["data_offsets"] = [4], [0, 16]
    elif case == "unknown dtype":
        entry["dtype"] = "F8_E4M3"
    else:
        name = "layer.gate"
    write_raw(tmp_path / "bad.safetensors", {name: entry}, b"\0" * 12)
    model = Tied()
    before = snapshot(model)
    # The good file comes first: it must not be copied either.
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_into(model, [tmp_path / "good.safetensors", tmp_path / "bad.safetensors"])
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
