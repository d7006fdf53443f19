"""The weights a push carries: safetensors, a manifest with real sha256s and tensor specs, and a
stream of chunks that reassembles to the exact files."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from services.genproto.rlhf.v1 import policy_pb2
from services.trainer.metrics import effective_updates
from services.trainer.weights_push import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    build_manifest,
    iter_requests,
    write_version,
)


@pytest.fixture
def tensors():
    torch.manual_seed(0)
    return {
        "model.embed.weight": torch.randn(50, 16),
        "model.norm.weight": torch.ones(16, dtype=torch.bfloat16),
    }


def test_manifest_has_file_sha256_sizes_and_tensor_specs(tmp_path, tensors):
    folder = write_version(tmp_path, 7, tensors)
    assert folder.name == "v00000007"
    manifest = build_manifest(folder, 7)
    data = (folder / WEIGHTS_FILE).read_bytes()
    assert manifest.weights_version == 7
    assert dict(manifest.file_sha256) == {WEIGHTS_FILE: hashlib.sha256(data).hexdigest()}
    assert dict(manifest.file_size) == {WEIGHTS_FILE: len(data)}
    specs = {t.name: (list(t.shape), t.dtype) for t in manifest.tensors}
    assert specs == {"model.embed.weight": ([50, 16], "F32"), "model.norm.weight": ([16], "BF16")}
    on_disk = json.loads((folder / MANIFEST_FILE).read_text())
    assert on_disk["file_sha256"] == dict(manifest.file_sha256)
    loaded = load_file(folder / WEIGHTS_FILE)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("chunk", [1000, 4096, 1 << 20])
def test_chunks_reassemble_to_the_file(tmp_path, tensors, chunk):
    folder = write_version(tmp_path, 2, tensors)
    manifest = build_manifest(folder, 2)
    # What goes on the wire, read by protobuf itself: the stream is plain UpdateWeightsRequests.
    requests = [
        policy_pb2.UpdateWeightsRequest.FromString(r)
        for r in iter_requests(folder, manifest, chunk)
    ]
    assert requests[0].WhichOneof("part") == "manifest" and requests[0].manifest == manifest
    chunks = [r.chunk for r in requests[1:]]
    assert all(r.WhichOneof("part") == "chunk" for r in requests[1:])
    assert all(len(c.data) <= chunk for c in chunks)
    size = manifest.file_size[WEIGHTS_FILE]
    assert len(chunks) == -(-size // chunk)  # ceil
    rebuilt = bytearray(size)
    for c in chunks:
        assert c.file_name == WEIGHTS_FILE
        rebuilt[c.offset : c.offset + len(c.data)] = c.data
    assert hashlib.sha256(rebuilt).hexdigest() == manifest.file_sha256[WEIGHTS_FILE]


def test_bad_chunk_size_is_refused(tmp_path, tensors):
    folder = write_version(tmp_path, 2, tensors)
    with pytest.raises(ValueError, match="chunk_bytes"):
        list(iter_requests(folder, build_manifest(folder, 2), 0))


def test_a_resume_voids_the_updates_a_crash_undid():
    log = [
        {"event": "resume", "step": 0},
        {"event": "update", "step": 1, "rollout_ids": ["a"]},
        {"event": "update", "step": 2, "rollout_ids": ["b"]},
        {"event": "update", "step": 3, "rollout_ids": ["c"]},  # not checkpointed: crash
        {"event": "resume", "step": 2},
        {"event": "update", "step": 3, "rollout_ids": ["c2"]},
    ]
    assert [u["rollout_ids"] for u in effective_updates(log)] == [["a"], ["b"], ["c2"]]


def test_replica_addresses_expand_a_name_to_every_address():
    from services.common.replicas import replica_addresses

    # localhost resolves (here to 127.0.0.1 and maybe ::1): each address becomes one replica.
    replicas = replica_addresses(["localhost:50051", "127.0.0.1:50051", "10.0.0.7:50051"])
    assert "127.0.0.1:50051" in replicas and "10.0.0.7:50051" in replicas
    assert len(replicas) == len(set(replicas))
    assert all(r.endswith(":50051") for r in replicas)


def test_written_while_hashed_equals_safetensors_and_the_digests_of_the_bytes(tmp_path, tensors):
    import blake3

    from services.common.digest import BLAKE3, SHA256
    from services.common.safetensors_file import write_safetensors
    from services.trainer.weights_push import read_manifest

    tensors = {**tensors, "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    path = tmp_path / "m.safetensors"
    digests = write_safetensors(path, tensors, (BLAKE3, SHA256))
    data = path.read_bytes()
    assert digests == {
        BLAKE3: blake3.blake3(data).hexdigest(),
        SHA256: hashlib.sha256(data).hexdigest(),
    }
    loaded = load_file(path)  # the safetensors library reads it
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    # The version folder's manifest, read back, is the one hashing the folder again gives.
    folder = write_version(tmp_path / "versions", 3, tensors, (BLAKE3, SHA256))
    assert read_manifest(folder) == build_manifest(folder, 3, (BLAKE3, SHA256))


def test_a_tensor_whose_dtype_safetensors_cannot_name_is_refused(tmp_path):
    from services.common.safetensors_file import write_safetensors

    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path / "m.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
