"""The weights folder and the checks a pushed set must pass, on real safetensors files."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from services.policy.weights import (
    ChunkWriter,
    IncomingFile,
    WeightsRejected,
    WeightsStore,
    compare_specs,
    files_specs,
    read_marker,
)


def write_set(path, hidden: int = 4):
    save_file(
        {"a.weight": torch.ones(hidden, 3), "b.bias": torch.zeros(3, dtype=torch.bfloat16)},
        str(path),
    )
    return path.read_bytes()


def test_specs_from_header_and_comparison(tmp_path):
    write_set(tmp_path / "m.safetensors")
    specs = files_specs([tmp_path / "m.safetensors"])
    assert specs == {"a.weight": ((4, 3), "F32"), "b.bias": ((3,), "BF16")}
    compare_specs(specs, dict(specs), "same")
    with pytest.raises(
        WeightsRejected, match="tensor a.weight has shape \\[5, 3\\], expected \\[4, 3\\]"
    ):
        compare_specs(specs, {**specs, "a.weight": ((5, 3), "F32")}, "x")
    with pytest.raises(WeightsRejected, match="dtype F32, expected BF16"):
        compare_specs(specs, {**specs, "b.bias": ((3,), "F32")}, "x")
    with pytest.raises(WeightsRejected, match="missing tensor b.bias"):
        compare_specs(specs, {"a.weight": specs["a.weight"]}, "x")
    with pytest.raises(WeightsRejected, match="unexpected tensor c"):
        compare_specs(specs, {**specs, "c": ((1,), "F32")}, "x")


@pytest.mark.parametrize("order", ["in_order", "reversed"])
def test_incoming_file_checks_size_and_sha256(tmp_path, order):
    data = write_set(tmp_path / "src.safetensors")
    chunks = [(o, data[o : o + 7]) for o in range(0, len(data), 7)]
    if order == "reversed":
        chunks.reverse()
    good = IncomingFile(tmp_path / "good.safetensors", len(data), hashlib.sha256(data).hexdigest())
    writer = ChunkWriter(depth=2)
    for offset, chunk in chunks:
        writer.put(good, offset, chunk)
    writer.close()
    good.finish()
    assert (tmp_path / "good.safetensors").read_bytes() == data
    bad = IncomingFile(tmp_path / "bad.safetensors", len(data), "0" * 64)
    for offset, chunk in chunks:
        bad.write(offset, chunk)
    with pytest.raises(WeightsRejected, match="sha256"):
        bad.finish()
    short = IncomingFile(
        tmp_path / "short.safetensors", len(data), hashlib.sha256(data).hexdigest()
    )
    short.write(0, data[:10])
    with pytest.raises(WeightsRejected, match="received 10 bytes"):
        short.finish()
    with pytest.raises(WeightsRejected, match="runs past"):
        IncomingFile(tmp_path / "long.safetensors", 4, "").write(0, data[:10])


def test_store_publishes_atomically_and_points_back(tmp_path):
    store = WeightsStore(tmp_path / "root")
    assert read_marker(store.root) is None
    for version in (2, 3, 4, 5):
        staged = store.staging(version)
        write_set(staged / "model.safetensors")
        marker = store.publish(version, staged)
        assert marker.weights_version == version
        assert marker.files == (store.root / f"v{version:08d}" / "model.safetensors",)
    assert sorted(p.name for p in store.root.glob("v*")) == ["v00000003", "v00000004", "v00000005"]
    store.point(4)
    assert read_marker(store.root).weights_version == 4


def test_staging_recycles_a_version_the_next_publish_would_prune(tmp_path):
    store = WeightsStore(tmp_path / "root")
    for version in (2, 3, 4):
        staged = store.staging(version)
        (staged / "model.safetensors").write_bytes(b"old bytes of version %d, long" % version)
        (staged / "stray.safetensors").write_bytes(b"x")
        store.publish(version, staged)
    staged = store.staging(5, reuse=["model.safetensors"])
    assert not (store.root / "v00000002").exists()  # recycled: v3, v4 (and v5) remain
    assert [p.name for p in staged.iterdir()] == ["model.safetensors"]  # only the named file
    incoming = IncomingFile(staged / "model.safetensors", 5, hashlib.sha256(b"fresh").hexdigest())
    incoming.write(0, b"fresh")
    incoming.finish()  # cut to the new size: no byte of version 2 is left behind
    assert (staged / "model.safetensors").read_bytes() == b"fresh"
    store.publish(5, staged)
    assert sorted(p.name for p in store.root.glob("v*")) == ["v00000003", "v00000004", "v00000005"]


def test_staging_never_recycles_what_current_points_at(tmp_path):
    store = WeightsStore(tmp_path / "root")
    for version in (2, 3, 4):
        staged = store.staging(version)
        (staged / "model.safetensors").write_bytes(b"v%d" % version)
        store.publish(version, staged)
    store.point(2)  # a failed swap pointed back at the oldest kept version
    staged = store.staging(5, reuse=["model.safetensors"])
    assert (store.root / "v00000002" / "model.safetensors").read_bytes() == b"v2"
    assert list(staged.iterdir()) == []


def test_staging_unlinks_a_hard_linked_file_instead_of_overwriting_it(tmp_path):
    """LoRA's base shard is one inode linked into every version: written in place, it would
    change the served version's bytes (which the Triton model's parameters view on a CPU)."""
    store = WeightsStore(tmp_path / "root")
    shard = tmp_path / "base-shard.safetensors"
    shard.write_bytes(b"base bytes")
    for version in (2, 3, 4):
        staged = store.staging(version)
        os.link(shard, staged / "model.safetensors")
        store.publish(version, staged)
    staged = store.staging(5, reuse=["model.safetensors"])
    assert list(staged.iterdir()) == []  # the link went; the next push writes a new file
    incoming = IncomingFile(staged / "model.safetensors", 5, hashlib.sha256(b"fresh").hexdigest())
    incoming.write(0, b"fresh")
    incoming.finish()
    assert shard.read_bytes() == b"base bytes"
    assert (store.root / "v00000004" / "model.safetensors").read_bytes() == b"base bytes"
