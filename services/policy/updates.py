"""Accepting a new weights version: from an UpdateWeights push, or from a `rlhf.weights.v1`
announcement a replica missed (catch-up from the announced folder), with the same checks.

Checks, in order, each refusing with a reason and leaving the served version as it was:
1. the version is newer than the served one; file names are plain `*.safetensors`;
2. the manifest's tensors equal the served model's (names, shapes, dtypes) - before any byte;
3. every file has exactly its manifest size and sha256 (hashed while it streams in);
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

from services.genproto.rlhf.v1 import events_pb2, policy_pb2
from services.policy.weights import (
    ChunkWriter,
    IncomingFile,
    TensorSpecs,
    WeightsRejected,
    WeightsStore,
    check_file_name,
    compare_specs,
    files_specs,
    sha256_file,
)

log = logging.getLogger(__name__)


def manifest_specs(manifest: policy_pb2.WeightsManifest) -> TensorSpecs:
    specs: TensorSpecs = {}
    for t in manifest.tensors:
        if t.name in specs:
            raise WeightsRejected(f"manifest: tensor {t.name} listed twice")
        specs[t.name] = (tuple(int(d) for d in t.shape), t.dtype)
    return specs


class WeightsUpdater:
    """Owns the served version; one update at a time."""

    def __init__(
        self,
        store: WeightsStore,
        served_specs: TensorSpecs,
        version: int,
        swap: Callable[[], int],
        on_version: Callable[[int], None] = lambda v: None,
    ):
        self.store = store
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

    def receive_push(
        self, manifest: policy_pb2.WeightsManifest, chunks: Iterable[policy_pb2.WeightsChunk]
    ) -> tuple[int, int]:
        """Returns (served version, bytes received); raises WeightsRejected with the reason."""
        with self._lock:
            self._check_newer(manifest.weights_version)
            names = set(manifest.file_sha256)
            if not names:
                raise WeightsRejected("manifest: no files")
            if names != set(manifest.file_size):
                raise WeightsRejected("manifest: file_sha256 and file_size name different files")
            for name in names:
                check_file_name(name)
            expected = manifest_specs(manifest)
            compare_specs(self.served_specs, expected, "manifest vs served model")
            staged = self.store.staging(manifest.weights_version, reuse=names)
            received, files = 0, {}
            clock = time.perf_counter()
            try:
                files = {
                    n: IncomingFile(staged / n, int(manifest.file_size[n]), manifest.file_sha256[n])
                    for n in sorted(names)
                }
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

    def _publish(self, version: int, staged: Path) -> int:
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
