"""Accepting a new weights version: from an UpdateWeights push, or from a `rlhf.weights.v1`
announcement a replica missed (catch-up from the announced folder), with the same checks.

Checks, in order, each refusing with a reason and leaving the served version as it was:
1. the version is newer than the served one; file names are plain `*.safetensors`;
2. the manifest's tensors equal the served model's (names, shapes, dtypes) - before any byte;
3. every file has exactly its manifest size and digest (BLAKE3, or sha256 from older senders),
   hashed while it streams in, through the UpdateWeights stream or the side channel
   (services/common/side_channel.py);
4. the tensors in the received files' headers equal the manifest's.
Then the set is published in the shared folder and the Triton model is asked to swap (a control
request), which it does between two batches; the call returns once Triton serves the version.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from safetensors import SafetensorError

from services.common.digest import SHA256, sha256_file
from services.common.lora_adapter import ADAPTER_FILE
from services.common.lora_adapter import read_config as read_adapter_config
from services.common.side_channel import SideChannelError, SideChannelListener, Ticket
from services.genproto.rlhf.v1 import events_pb2, policy_pb2
from services.policy import lora
from services.policy.weights import (
    ChunkWriter,
    IncomingFile,
    TensorSpecs,
    WeightsRejected,
    WeightsStore,
    check_file_name,
    compare_specs,
    files_specs,
    folder_weight_files,
    receive_side_channel,
)

log = logging.getLogger(__name__)


def manifest_digests(manifest: policy_pb2.WeightsManifest) -> tuple[str, dict[str, str]]:
    """(algorithm, hex digest by file name): `file_digest` under `digest_algorithm`, or the
    `file_sha256` of a sender from before BLAKE3."""
    if manifest.digest_algorithm in ("", SHA256):
        return SHA256, dict(manifest.file_sha256)
    return manifest.digest_algorithm, dict(manifest.file_digest)


def manifest_specs(manifest: policy_pb2.WeightsManifest) -> TensorSpecs:
    specs: TensorSpecs = {}
    for t in manifest.tensors:
        if t.name in specs:
            raise WeightsRejected(f"manifest: tensor {t.name} listed twice")
        specs[t.name] = (tuple(int(d) for d in t.shape), t.dtype)
    return specs


class WeightsUpdater:
    """Owns the served version; one update at a time."""

    side_channel: SideChannelListener | None = None
    """Where pushes with `TRANSPORT_SIDE_CHANNEL` send their bytes; None refuses them."""

    def __init__(
        self,
        store: WeightsStore,
        served_specs: TensorSpecs,
        version: int,
        swap: Callable[[], int],
        on_version: Callable[[int], None] = lambda v: None,
        base_folders: dict[int, Path] | None = None,
    ):
        self.store = store
        self.base_folders = dict(base_folders or {})
        """Version -> folder of full weights a LoRA adapter may apply to (the model folder)."""
        self.last_merge_s = 0.0
        """Seconds the last LoRA merge took (inside publish_and_swap_s)."""
        self.served_specs = served_specs
        self.version = version
        self._swap = swap
        """Asks Triton to pick up the published set; returns the version it now serves."""
        self._on_version = on_version
        self._lock = threading.Lock()
        self.last_timings: dict[str, float] = {}
        """Seconds spent in each phase of the last accepted update (logged, read by the benchmark)."""

    def _check_newer(self, version: int) -> None:
        if version <= self.version:
            raise WeightsRejected(
                f"weights_version {version} is not newer than the served {self.version}"
            )

    def _check_manifest(
        self, manifest: policy_pb2.WeightsManifest
    ) -> tuple[TensorSpecs, str, dict[str, str]]:
        """Checks 1-2, before any byte: (expected tensors, digest algorithm, digest by file)."""
        self._check_newer(manifest.weights_version)
        algorithm, digests = manifest_digests(manifest)
        names = set(digests)
        if not names:
            raise WeightsRejected("manifest: no files")
        if names != set(manifest.file_size):
            raise WeightsRejected("manifest: file digests and file_size name different files")
        for name in names:
            check_file_name(name)
        expected = manifest_specs(manifest)
        compare_specs(self.served_specs, expected, "manifest vs served model")
        return expected, algorithm, digests

    def receive_push(
        self,
        manifest: policy_pb2.WeightsManifest,
        chunks: Iterable[policy_pb2.WeightsChunk] | None = None,
        offer: Callable[[Ticket], None] | None = None,
    ) -> tuple[int, int]:
        """Returns (served version, bytes received); raises WeightsRejected with the reason.

        The bytes come as `chunks` of the UpdateWeights stream or, with `offer`, over the side
        channel: once the manifest passed its checks a ticket is issued, `offer` hands it to the
        caller (the gRPC handler sends it as initial metadata) and the files are read from the
        connection that presents it."""
        with self._lock:
            expected, algorithm, digests = self._check_manifest(manifest)
            staged = self.store.staging(manifest.weights_version, reuse=digests)
            received, files = 0, {}
            clock = time.perf_counter()
            try:
                files = {
                    n: IncomingFile(staged / n, int(manifest.file_size[n]), digests[n], algorithm)
                    for n in sorted(digests)
                }
                if offer is not None:
                    received = self._receive_side_channel(list(files.values()), offer)
                else:
                    received = self._receive_chunks(files, chunks or ())
                received_at = time.perf_counter()
                for f in files.values():
                    f.finish()
                compare_specs(
                    expected, files_specs([f.path for f in files.values()]), "files vs manifest"
                )
                verified_at = time.perf_counter()
                version = self._publish(manifest.weights_version, staged)
                self.last_timings = {
                    "receive_s": received_at - clock,
                    "verify_s": verified_at - received_at,
                    "publish_and_swap_s": time.perf_counter() - verified_at,
                }
                log.info("weights version %s accepted: %s", version, self.last_timings)
                return version, received
            finally:
                for f in files.values():
                    f.close()
                shutil.rmtree(staged, ignore_errors=True)

    @staticmethod
    def _receive_chunks(files: dict[str, IncomingFile], chunks: Iterable) -> int:
        received = 0
        writer = ChunkWriter()
        try:
            for chunk in chunks:
                if chunk.file_name not in files:
                    raise WeightsRejected(
                        f"chunk for {chunk.file_name!r}, which the manifest does not list"
                    )
                writer.put(files[chunk.file_name], chunk.offset, chunk.data)
                received += len(chunk.data)
        finally:
            writer.close()
        return received

    def _receive_side_channel(
        self, files: list[IncomingFile], offer: Callable[[Ticket], None]
    ) -> int:
        if self.side_channel is None:
            raise WeightsRejected("this replica offers no side channel: send the chunks")
        ticket = self.side_channel.issue()
        try:
            offer(ticket)
            try:
                conn = ticket.wait(self.side_channel.ticket_ttl_s)
            except SideChannelError as exc:
                raise WeightsRejected(f"side channel: {exc}") from None
            return receive_side_channel(conn, files)
        finally:
            self.side_channel.revoke(ticket)  # spent or not, and its connection closed

    def install_folder(self, event: events_pb2.WeightsVersionEvent) -> int:
        """Catch-up: copies an announced version from `event.location`, checked like a push."""
        with self._lock:
            self._check_newer(event.weights_version)
            if not event.file_sha256:
                raise WeightsRejected("announcement lists no files")
            staged = self.store.staging(event.weights_version)
            try:
                for name, digest in sorted(event.file_sha256.items()):
                    check_file_name(name)
                    source = Path(event.location) / name
                    if not source.is_file():
                        raise WeightsRejected(f"{source} does not exist")
                    shutil.copyfile(source, staged / name)
                    got = sha256_file(staged / name)
                    if got != digest.lower():
                        raise WeightsRejected(
                            f"{name}: sha256 {got} does not match the announced {digest}"
                        )
                compare_specs(
                    self.served_specs,
                    files_specs(sorted(staged.glob("*.safetensors"))),
                    "files vs served model",
                )
                return self._publish(event.weights_version, staged)
            finally:
                shutil.rmtree(staged, ignore_errors=True)

    def _merge_adapter(self, staged: Path) -> None:
        """A LoRA push carries only its adapter: the full set Triton loads is written into the
        staged folder here, from the base the adapter names (services/policy/lora.py)."""
        if not lora.holds_adapter(staged):
            return
        started = time.perf_counter()
        try:
            base_version = read_adapter_config(staged / ADAPTER_FILE).base_version
            base = self.base_folders.get(base_version) or self.store.folders.path(base_version)
            lora.merge_folder(staged, folder_weight_files(base), cache_dir=self.store.root)
        except (ValueError, OSError, SafetensorError) as exc:
            raise WeightsRejected(f"LoRA adapter not merged: {exc}") from None
        self.last_merge_s = time.perf_counter() - started

    def _publish(self, version: int, staged: Path) -> int:
        self._merge_adapter(staged)
        previous = self.version
        self.store.publish(version, staged)
        served = self._swap()
        if served != version:
            self.store.point(previous)
            raise WeightsRejected(
                f"the Triton model did not load version {version} (serves {served})"
            )
        self.version = served
        self._on_version(served)
        return served
