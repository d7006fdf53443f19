"""Publishing a weights version: safetensors on disk with a manifest of digests, sent to every
policy replica through `PolicyService.UpdateWeights`, then announced on `rlhf.weights.v1`.

    folder = write_version(settings.weights_dir, version, tensors, (BLAKE3,))
    manifest = build_manifest(folder, version, (BLAKE3,))
    results = push_all(settings.policy_addresses, folder, manifest)   # side channel by default
    add_sha256(manifest, folder)                                       # what announcements list
    announce(producer, topics.WEIGHTS, "policy", manifest, location=folder)

The manifest (version, BLAKE3 or sha256 digest and size of every file, name/shape/dtype of every
tensor) always travels on the gRPC control call, which is authorised like every control call.
The bytes take one of two paths (`transport`):
- SIDE_CHANNEL (default): the replica answers the manifest with a one-time token and a port in
  the call's initial metadata; the files go over a raw TCP connection by `sendfile`, and the
  result comes back on the call (services/common/side_channel.py, which also says what it does
  and does not protect when gRPC uses TLS). A replica that offers no token (an older one, or one
  with the side channel off) or whose port cannot be reached is streamed to instead;
- STREAM: the files in chunks of `chunk_bytes` inside the UpdateWeights stream, read lazily from
  disk and serialized by `services.common.weights_wire` (protobuf's bytes on the wire, built with
  one copy from the page cache). The channel's message limit is raised above the chunk size on
  this side; the policy raises its own (services/common/grpc_server.message_size_options).

`NewestWins` is the trainer's publisher thread: the push runs beside the next update, at most
one at a time, and a version that is still waiting when a newer one comes is dropped.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from safetensors.torch import save

from services.common.channels import client_channel
from services.common.control_auth import control_metadata
from services.common.digest import BLAKE3, SHA256, file_digest, sha256_file
from services.common.grpc_server import message_size_options
from services.common.lora_adapter import ADAPTER_FILE, PEFT_CONFIG_FILE, AdapterConfig
from services.common.replicas import replica_addresses
from services.common.safetensors_file import write_safetensors
from services.common.safetensors_header import file_specs
from services.common.side_channel import send_files, ticket_from_metadata
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


def write_version(
    root: Path,
    version: int,
    tensors: dict[str, torch.Tensor],
    digests: tuple[str, ...] = (SHA256,),
) -> Path:
    """Writes `v{version}/model.safetensors` and its manifest (with `digests`, see
    `build_manifest`, hashed while the file is written) atomically (temp folder + rename);
    `read_manifest` gives the manifest back without hashing again."""
    return commit_version(root, version, stage_version(root, version, tensors, digests))


def stage_version(
    root: Path,
    version: int,
    tensors: dict[str, torch.Tensor],
    digests: tuple[str, ...] = (SHA256,),
) -> Path:
    """`write_version` up to the rename: the complete folder under its temporary name, which no
    reader takes for a version (`commit_version` puts it in place; a crash leaves it to the
    next `begin` of that number)."""
    tmp = VersionedFolders(root).begin(version)
    hashed = write_safetensors(tmp / WEIGHTS_FILE, tensors, digests)
    known = {algorithm: {WEIGHTS_FILE: digest} for algorithm, digest in hashed.items()}
    manifest = build_manifest(tmp, version, digests, known)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest_to_json(manifest), indent=1))
    return tmp


def commit_version(root: Path, version: int, staged: Path) -> Path:
    """Renames a staged version folder into place (replacing one of the same number)."""
    return VersionedFolders(root).commit(staged, version)


def read_manifest(folder: Path) -> policy_pb2.WeightsManifest:
    """The manifest `write_version` (or `write_adapter_version`) wrote into `folder`."""
    data = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    manifest = policy_pb2.WeightsManifest(weights_version=int(data["weights_version"]))
    manifest.file_size.update({k: int(v) for k, v in data["file_size"].items()})
    manifest.file_sha256.update(data.get("file_sha256", {}))
    if data.get("digest_algorithm"):
        manifest.digest_algorithm = data["digest_algorithm"]
        manifest.file_digest.update(data["file_digest"])
    manifest.tensors.extend(
        policy_pb2.TensorSpec(name=t["name"], shape=t["shape"], dtype=t["dtype"])
        for t in data["tensors"]
    )
    return manifest


def write_adapter_version(
    root: Path,
    version: int,
    adapter: dict[str, torch.Tensor],
    config: AdapterConfig,
    peft_config: dict | None = None,
) -> Path:
    """A LoRA run's version folder: `v{version}/adapter_model.safetensors` (the merge settings in
    its metadata, services/common/lora_adapter.py), peft's adapter_config.json and the manifest,
    atomically. Only the safetensors file is pushed; the policy merges it into its base."""
    return commit_version(
        root, version, stage_adapter_version(root, version, adapter, config, peft_config)
    )


def stage_adapter_version(
    root: Path,
    version: int,
    adapter: dict[str, torch.Tensor],
    config: AdapterConfig,
    peft_config: dict | None = None,
) -> Path:
    """`write_adapter_version` up to the rename (see `stage_version`)."""
    tmp = VersionedFolders(root).begin(version)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}
    write_durable(tmp / ADAPTER_FILE, save(tensors, metadata=config.to_metadata()))
    if peft_config is not None:
        write_durable(tmp / PEFT_CONFIG_FILE, json.dumps(peft_config, indent=1).encode())
    manifest = build_manifest(tmp, version)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest_to_json(manifest), indent=1))
    return tmp


def tensor_specs(path: Path) -> list[policy_pb2.TensorSpec]:
    """Name, shape and safetensors dtype of every tensor, from the file's header alone."""
    return [
        policy_pb2.TensorSpec(name=name, shape=list(shape), dtype=dtype)
        for name, (shape, dtype) in sorted(file_specs(path).items())
    ]


def build_manifest(
    folder: Path,
    version: int,
    digests: tuple[str, ...] = (SHA256,),
    known: dict[str, dict[str, str]] | None = None,
) -> policy_pb2.WeightsManifest:
    """The manifest of every `*.safetensors` file in `folder`, with the digests named: SHA256
    fills `file_sha256` (what every policy accepts, and what `rlhf.weights.v1` announces);
    BLAKE3 fills `file_digest`, which a policy then checks instead (5x faster to hash).
    `known` ({algorithm: {file name: hex digest}}, taken as the files were written) spares
    hashing those files again."""
    known = known or {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    manifest = policy_pb2.WeightsManifest(weights_version=version)
    for path in files:
        manifest.file_size[path.name] = path.stat().st_size
        manifest.tensors.extend(tensor_specs(path))
    if SHA256 in digests:
        manifest.file_sha256.update(known.get(SHA256, {}))
        add_sha256(manifest, folder)  # the files not in `known`
    if BLAKE3 in digests:
        manifest.digest_algorithm = BLAKE3
        for path in files:
            digest = known.get(BLAKE3, {}).get(path.name)
            manifest.file_digest[path.name] = digest or file_digest(path, BLAKE3)
    return manifest


def add_sha256(manifest: policy_pb2.WeightsManifest, folder: Path) -> None:
    """Fills `file_sha256` where it is missing (an announcement needs it)."""
    for name in sorted(manifest.file_size):
        if name not in manifest.file_sha256:
            manifest.file_sha256[name] = sha256_file(Path(folder) / name)


def manifest_to_json(manifest: policy_pb2.WeightsManifest) -> dict:
    return {
        "weights_version": manifest.weights_version,
        "file_sha256": dict(sorted(manifest.file_sha256.items())),
        "file_size": dict(sorted(manifest.file_size.items())),
        **(
            {
                "digest_algorithm": manifest.digest_algorithm,
                "file_digest": dict(sorted(manifest.file_digest.items())),
            }
            if manifest.digest_algorithm
            else {}
        ),
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
    transport: str = ""
    """How the bytes went: SIDE_CHANNEL or STREAM (empty when none were sent)."""


SIDE_CHANNEL, STREAM = "side_channel", "stream"
"""Transports of a push: the raw TCP side channel (services/common/side_channel.py, used when
the replica offers one) or chunks in the UpdateWeights stream."""


def push(
    address: str,
    folder: Path,
    manifest: policy_pb2.WeightsManifest,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout_s: float = 300.0,
    max_message_bytes: int = 64 << 20,
    requests: Iterator[bytes] | None = None,
    transport: str = SIDE_CHANNEL,
) -> PushResult:
    """Sends one version to one replica; a refusal or an RPC error is a result, not a raise.

    With `transport=SIDE_CHANNEL` the bytes go over the side channel when the replica offers
    one, else (an older or a side-channel-less replica) in the stream."""
    limit = max(max_message_bytes, chunk_bytes + (1 << 20))
    started = time.perf_counter()
    sent = sum(manifest.file_size.values())
    with client_channel(address, options=message_size_options(limit)) as channel:
        call = update_weights_call(channel)
        if transport == SIDE_CHANNEL and requests is None and address not in _UNREACHABLE:
            try:
                reply = _push_side_channel(call, address, folder, manifest, timeout_s)
            except grpc.RpcError as exc:
                return _failed(address, exc, sent, started)
            if reply is not None:
                return _result(address, reply, sent, started, SIDE_CHANNEL)
            log.info("replica %s offered no side channel: streaming the push", address)
        stream = policy_pb2.WeightsManifest()
        stream.CopyFrom(manifest)
        stream.transport = policy_pb2.WeightsManifest.TRANSPORT_STREAM
        try:
            reply = call(
                requests if requests is not None else iter_requests(folder, stream, chunk_bytes),
                timeout=timeout_s,
                metadata=control_metadata(),
            )
        except grpc.RpcError as exc:
            return _failed(address, exc, sent, started)
    return _result(address, reply, sent, started, STREAM)


def _push_side_channel(
    call: grpc.StreamUnaryMultiCallable,
    address: str,
    folder: Path,
    manifest: policy_pb2.WeightsManifest,
    timeout_s: float,
) -> policy_pb2.UpdateWeightsResponse | None:
    """The control call carries the manifest alone; the replica answers with a ticket in its
    initial metadata, the files go over the side channel, the result comes back on the call.
    None when the replica offered no ticket (the caller then streams the push)."""
    offer = policy_pb2.WeightsManifest()
    offer.CopyFrom(manifest)
    offer.transport = policy_pb2.WeightsManifest.TRANSPORT_SIDE_CHANNEL
    future = call.future(
        iter([encode_manifest(offer)]), timeout=timeout_s, metadata=control_metadata()
    )
    ticket = ticket_from_metadata(future.initial_metadata())
    if ticket is None:
        reply = future.result()  # an RpcError (not authorised, say) is final: raised
        return reply if reply.accepted else None
    port, token = ticket
    host = address.rpartition(":")[0].strip("[]")
    paths = [Path(folder) / name for name in sorted(manifest.file_size)]
    try:
        send_files(host, port, token, paths, timeout_s)
    except OSError as exc:
        if future.done():  # the replica refused the bytes early; its reason is the answer
            return future.result()
        future.cancel()  # takes the ticket with it on the replica
        _UNREACHABLE.add(address)
        log.warning(
            "side channel to %s:%s failed (%s): streaming to this replica from now on",
            host, port, exc,
        )  # fmt: skip
        return None
    return future.result()


_UNREACHABLE: set[str] = set()
"""Replicas whose side channel could not be reached (a firewall or a NetworkPolicy without its
port): streamed to for the rest of this process, so that each push does not wait for the
connect to time out again."""


def _result(address: str, reply, sent: int, started: float, transport: str) -> PushResult:
    return PushResult(
        address,
        reply.accepted,
        reply.weights_version,
        reply.reason,
        sent,
        time.perf_counter() - started,
        transport,
    )


def _failed(address: str, exc: grpc.RpcError, sent: int, started: float) -> PushResult:
    return PushResult(
        address,
        False,
        0,
        f"{exc.code().name}: {exc.details()}",
        sent,
        time.perf_counter() - started,
    )


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of `tensors` that the next update cannot change, for a push that runs beside
    it (one memcpy: 0.1 s for SmolLM2-135M, against writing and pushing them on the training
    path)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


class NewestWins:
    """Runs `work(job)` on one thread beside the caller: at most one job in flight, and a job
    submitted while one runs replaces any still waiting (an older weights version nobody needs
    once a newer one exists). An exception is logged and counted; the thread goes on."""

    def __init__(self, work: Callable[[object], None], name: str = "newest-wins"):
        self._work = work
        self._cond = threading.Condition()
        self._pending: object | None = None
        self._busy = self._closed = False
        self.superseded = 0
        """Jobs replaced by a newer one before they started."""
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: object) -> None:
        with self._cond:
            if self._pending is not None:
                self.superseded += 1
            self._pending = job
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """True once nothing runs or waits."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Finishes the running and the waiting job, then stops the thread."""
        self.wait_idle(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                job, self._pending, self._busy = self._pending, None, True
            try:
                self._work(job)
            except Exception:
                self.failed += 1
                log.exception("%s failed", self._thread.name)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


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
    transport: str = SIDE_CHANNEL,
) -> list[PushResult]:
    """Pushes to every replica at once; with `skip_current`, a replica that already serves this
    version (or a newer one) is not sent it again (a restarted trainer re-publishes its last)."""

    def one(address: str) -> PushResult:
        if skip_current:
            current = serving_version(address)
            if current is not None and current >= manifest.weights_version:
                return PushResult(address, True, current, "already serving", 0, 0.0)
        return push(
            address, folder, manifest, chunk_bytes, timeout_s, max_message_bytes, None, transport
        )

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
    """Publishes the version on `rlhf.weights.v1` (keyed by model name) and waits for the ack.
    The announcement lists sha256 digests, as it always has (`add_sha256` first for a manifest
    built with BLAKE3 alone)."""
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
