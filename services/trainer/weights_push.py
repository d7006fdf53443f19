"""Publishing a weights version: safetensors on disk with a sha256 manifest, streamed to every
policy replica over `PolicyService.UpdateWeights`, then announced on `rlhf.weights.v1`.

    folder = write_version(settings.weights_dir, version, learner.policy_state_dict())
    manifest = build_manifest(folder, version)
    results = push_all(settings.policy_addresses, folder, manifest, chunk_bytes=1 << 20)
    announce(producer, topics.WEIGHTS, "policy", manifest, location=folder)

The stream is the manifest first (version, sha256 and size of every file, name/shape/dtype of
every tensor), then the files in chunks of `chunk_bytes`, read lazily from disk so a large model
never sits in memory twice, and serialized by `services.common.weights_wire` (protobuf's bytes
on the wire, built with one copy from the page cache). The channel's message limit is raised
above the chunk size on this side; the policy raises its own
(services/common/grpc_server.message_size_options).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from safetensors.torch import save

from services.common.channels import client_channel
from services.common.control_auth import control_metadata
from services.common.digest import sha256_file
from services.common.grpc_server import message_size_options
from services.common.replicas import replica_addresses
from services.common.safetensors_header import file_specs
from services.common.versions import VersionedFolders, write_durable
from services.common.weights_wire import UPDATE_WEIGHTS_METHOD, encode_chunk, encode_manifest
from services.genproto.rlhf.v1 import events_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
DEFAULT_CHUNK_BYTES = 1 << 20
"""Bytes per UpdateWeights chunk: 1 and 4 MiB measured alike, 16 MiB slower (bench/weight_swap.py)."""


def version_dir(root: Path, version: int) -> Path:
    return VersionedFolders(root).path(version)


def write_version(root: Path, version: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Writes `v{version}/model.safetensors` and its manifest atomically (temp folder + rename)."""
    store = VersionedFolders(root)
    tmp = store.begin(version)
    write_durable(
        tmp / WEIGHTS_FILE, save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    )
    manifest = build_manifest(tmp, version)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest_to_json(manifest), indent=1))
    return store.commit(tmp, version)


def tensor_specs(path: Path) -> list[policy_pb2.TensorSpec]:
    """Name, shape and safetensors dtype of every tensor, from the file's header alone."""
    return [
        policy_pb2.TensorSpec(name=name, shape=list(shape), dtype=dtype)
        for name, (shape, dtype) in sorted(file_specs(path).items())
    ]


def build_manifest(folder: Path, version: int) -> policy_pb2.WeightsManifest:
    """The manifest of every `*.safetensors` file in `folder`."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    manifest = policy_pb2.WeightsManifest(weights_version=version)
    for path in files:
        manifest.file_sha256[path.name] = sha256_file(path)
        manifest.file_size[path.name] = path.stat().st_size
        manifest.tensors.extend(tensor_specs(path))
    return manifest


def manifest_to_json(manifest: policy_pb2.WeightsManifest) -> dict:
    return {
        "weights_version": manifest.weights_version,
        "file_sha256": dict(sorted(manifest.file_sha256.items())),
        "file_size": dict(sorted(manifest.file_size.items())),
        "tensors": [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in manifest.tensors
        ],
    }


def iter_requests(
    folder: Path, manifest: policy_pb2.WeightsManifest, chunk_bytes: int
) -> Iterator[bytes]:
    """The UpdateWeights stream, serialized: the manifest, then each file in order,
    `chunk_bytes` at a time (encoded by `weights_wire`, which spares protobuf's copies)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    yield encode_manifest(manifest)
    for name in sorted(manifest.file_size):
        with open(Path(folder) / name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                continue
            # Each message is built straight from the page cache: one copy per byte.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                for offset in range(0, size, chunk_bytes):
                    with memoryview(mapped)[offset : offset + chunk_bytes] as data:
                        message = encode_chunk(name, offset, data)
                    yield message


def update_weights_call(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    """UpdateWeights on `channel`, taking already serialized requests (`iter_requests`)."""
    return channel.stream_unary(
        UPDATE_WEIGHTS_METHOD,
        request_serializer=None,
        response_deserializer=policy_pb2.UpdateWeightsResponse.FromString,
    )


@dataclass
class PushResult:
    """How one replica answered a push."""

    address: str
    accepted: bool
    serving_version: int
    reason: str
    bytes_sent: int
    seconds: float


def push(
    address: str,
    folder: Path,
    manifest: policy_pb2.WeightsManifest,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout_s: float = 300.0,
    max_message_bytes: int = 64 << 20,
    requests: Iterator[bytes] | None = None,
) -> PushResult:
    """Streams one version to one replica; a refusal or an RPC error is a result, not a raise."""
    limit = max(max_message_bytes, chunk_bytes + (1 << 20))
    started = time.perf_counter()
    sent = sum(manifest.file_size.values())
    with client_channel(address, options=message_size_options(limit)) as channel:
        try:
            reply = update_weights_call(channel)(
                requests if requests is not None else iter_requests(folder, manifest, chunk_bytes),
                timeout=timeout_s,
                metadata=control_metadata(),
            )
        except grpc.RpcError as exc:
            return PushResult(
                address,
                False,
                0,
                f"{exc.code().name}: {exc.details()}",
                sent,
                time.perf_counter() - started,
            )
    return PushResult(
        address,
        reply.accepted,
        reply.weights_version,
        reply.reason,
        sent,
        time.perf_counter() - started,
    )


def serving_version(address: str, timeout_s: float = 10.0) -> int | None:
    """The version a replica serves now, or None if it does not answer."""
    with client_channel(address) as channel:
        try:
            return (
                policy_pb2_grpc.PolicyServiceStub(channel)
                .GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=timeout_s)
                .weights_version
            )
        except grpc.RpcError:
            return None


def push_all(
    addresses: list[str],
    folder: Path,
    manifest: policy_pb2.WeightsManifest,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout_s: float = 300.0,
    max_message_bytes: int = 64 << 20,
    skip_current: bool = True,
) -> list[PushResult]:
    """Pushes to every replica at once; with `skip_current`, a replica that already serves this
    version (or a newer one) is not sent it again (a restarted trainer re-publishes its last)."""

    def one(address: str) -> PushResult:
        if skip_current:
            current = serving_version(address)
            if current is not None and current >= manifest.weights_version:
                return PushResult(address, True, current, "already serving", 0, 0.0)
        return push(address, folder, manifest, chunk_bytes, timeout_s, max_message_bytes)

    addresses = replica_addresses(addresses)
    if not addresses:
        return []
    with ThreadPoolExecutor(max_workers=len(addresses)) as pool:
        results = list(pool.map(one, addresses))
    for r in results:
        level = logging.INFO if r.accepted else logging.WARNING
        log.log(
            level,
            "weights push",
            extra={"fields": r.__dict__ | {"version": manifest.weights_version}},
        )
    return results


def announce(
    producer, topic: str, model: str, manifest: policy_pb2.WeightsManifest, location: Path | str
) -> None:
    """Publishes the version on `rlhf.weights.v1` (keyed by model name) and waits for the ack."""
    created = Timestamp()
    created.GetCurrentTime()
    event = events_pb2.WeightsVersionEvent(
        model=model,
        weights_version=manifest.weights_version,
        file_sha256=dict(manifest.file_sha256),
        location=str(location),
        created_at=created,
    )
    producer.send(topic, key=model, value=event).get(timeout=60)
