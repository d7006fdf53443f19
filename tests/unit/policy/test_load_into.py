"""`load_into`: the swap's copy of a pushed safetensors set into the served parameters, and its
`share` mode, where CPU parameters become copy-on-write views of the pushed files."""

from __future__ import annotations

import gc
import json
import struct
from pathlib import Path

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
@pytest.mark.parametrize("share", [False, True])
def test_a_malformed_file_is_refused_before_any_parameter_changes(tmp_path, case, share):
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
        load_into(model, [tmp_path / "good.safetensors", tmp_path / "bad.safetensors"], share=share)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file-backed mapping of this process (Linux)."""
    gc.collect()
    found = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, end, fields[5]))
    return found


def mapped_file(address: int) -> str | None:
    return next((path for start, end, path in mappings() if start <= address < end), None)


def test_shared_parameters_are_views_of_the_file_and_writes_stay_private(tmp_path):
    tensors = trained(4)
    first = tmp_path / "v1.safetensors"
    save_file(tensors, str(first))
    on_disk = first.read_bytes()
    model = Tied()
    load_into(model, [first], share=True)
    for name, value in tensors.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.head.weight is model.embed.weight  # still tied: one parameter, new data
    # No copy: every parameter's memory lies in the file's mapping.
    for name in tensors:
        assert mapped_file(model.get_parameter(name).data_ptr()) == str(first), name
    # A write into a shared parameter changes the model, never the file (copy-on-write).
    with torch.no_grad():
        model.layer.weight.add_(1.0)
    assert torch.equal(model.layer.weight, tensors["layer.weight"] + 1.0)
    assert first.read_bytes() == on_disk
    # The next version replaces the views: the first file is no longer mapped.
    second = tmp_path / "v2.safetensors"
    save_file(trained(5), str(second))
    load_into(model, [second], share=True)
    for name, value in trained(5).items():
        assert torch.equal(model.state_dict()[name], value), name
    paths = {path for _, _, path in mappings()}
    assert str(second) in paths and str(first) not in paths


def test_shared_loading_copies_what_cannot_be_viewed(tmp_path):
    """A parameter of another dtype than the file's gets the cast values, not a view."""
    tensors = trained(6)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    model = Tied(dtype=torch.bfloat16)
    load_into(model, [path], share=True)
    assert model.layer.weight.dtype == torch.bfloat16
    assert torch.equal(model.layer.weight, tensors["layer.weight"].to(torch.bfloat16))
    assert torch.equal(model.head.weight, tensors["embed.weight"].to(torch.bfloat16))
    assert torch.equal(model.extra, tensors["extra"])
    assert mapped_file(model.extra.data_ptr()) == str(path)  # bf16 in the file too: a view
    assert mapped_file(model.layer.weight.data_ptr()) != str(path)  # cast: a copy
