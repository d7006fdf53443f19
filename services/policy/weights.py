"""Weights versions of the policy: the shared folder both containers see, the checks a new set
must pass, and the receiving end of an UpdateWeights push.

Layout of the shared weights folder (an emptyDir mounted by the gRPC and the Triton containers):

    <root>/v00000002/model.safetensors ...   one folder per accepted version
    <root>/CURRENT                           {"weights_version": 2, "files": ["v00000002/..."]}

The gRPC service writes and verifies a version in a staging folder, renames it into place and
then replaces CURRENT atomically (`os.replace`). The Triton model stats CURRENT at the start of
every execute (one syscall) and, when it changed, copies the new tensors into its parameters
before generating: the swap falls between two batches, and every response carries the version
its batch used.
"""

from __future__ import annotations

import mmap
import os
import queue
import shutil
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.digest import SHA256, UnknownDigest, file_digest, new_hasher
from services.common.safetensors_header import (
    HeaderError,
    TensorSpecs,
    differences,
    file_specs,
    merged_specs,
    summary,
)
from services.common.versions import MARKER, VersionedFolders
from services.policy import lora

KEEP_VERSIONS = 3


class WeightsRejected(ValueError):
    """A weights set failed a check; the message is the reason reported to the pusher."""


def files_specs(paths: list[Path]) -> TensorSpecs:
    """The tensors of a set of shards, from their headers (the data is not read); a tensor in two
    shards is refused."""
    try:
        return merged_specs(file_specs(p) for p in paths)
    except HeaderError as error:
        raise WeightsRejected(str(error)) from None


def folder_weight_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return files


def compare_specs(expected: TensorSpecs, got: TensorSpecs, what: str) -> None:
    """Raises WeightsRejected naming the first difference between two tensor sets. A LoRA
    adapter (`got`) checked against a full model (`expected`) must fit it instead of equal it;
    it becomes a full set at publication (services/policy/lora.py)."""
    problems = differences(expected, got)
    if problems and lora.is_adapter(got) and not lora.is_adapter(expected):
        problems = lora.adapter_problems(expected, got)
    if problems:
        raise WeightsRejected(f"{what}: {summary(problems, limit=1)}")


def check_file_name(name: str) -> None:
    if not name.endswith(".safetensors") or "/" in name or "\\" in name or name.startswith("."):
        raise WeightsRejected(f"file name {name!r}: expected a plain *.safetensors name")


@dataclass(frozen=True)
class Marker:
    weights_version: int
    files: tuple[Path, ...]


def read_marker(root: Path) -> Marker | None:
    data = VersionedFolders(root).read_marker()
    if data is None:
        return None
    return Marker(int(data["weights_version"]), tuple(Path(root) / f for f in data["files"]))


@dataclass
class WeightsStore:
    """The shared weights folder: staging, atomic publication of a version, pruning."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.folders = VersionedFolders(self.root)

    def staging(self, version: int, reuse: Iterable[str] = ()) -> Path:
        """A staging folder for `version`. With `reuse` (the file names about to arrive), it is
        the folder of a version that the next publish would prune anyway, emptied of every other
        file: the push overwrites those files in place, which spares the kernel allocating fresh
        pages (and the filesystem fresh blocks) for every byte of every version. Measured: 540 MB
        written over an existing file in 0.08 s, into a new one in 0.2-0.6 s. The folder is never
        one of the KEEP_VERSIONS - 1 newest, so never one the Triton model's parameters view
        (`load_into(share=True)`: the served version's, and the previous one's until the swap)."""
        path = self.root / f".staging-{self.folders.name(version)}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        old = self._recyclable() if reuse else None
        if old is None:
            path.mkdir()
            return path
        old.rename(path)
        keep = set(reuse)
        for entry in path.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.name not in keep or entry.stat().st_nlink > 1:
                # A hard link (LoRA's base shard is linked into every version) shares its bytes
                # with other folders, a served version's among them: never written in place.
                entry.unlink()
        return path

    def _recyclable(self) -> Path | None:
        """The oldest version folder beyond the KEEP_VERSIONS - 1 newest, unless CURRENT uses it."""
        marker = read_marker(self.root)
        current = {f.parent.name for f in marker.files} if marker else set()
        versions = [p for _, p in self.folders.folders()]
        for old in versions[: len(versions) - (KEEP_VERSIONS - 1)]:
            if old.name not in current:
                return old
        return None

    def publish(self, version: int, staged: Path) -> Marker:
        """Moves a verified staging folder into place and points CURRENT at it."""
        final = self.folders.path(version)
        shutil.rmtree(final, ignore_errors=True)
        staged.rename(final)
        self._point(version, final)
        self.folders.prune(KEEP_VERSIONS, protect=[final])
        return read_marker(self.root)

    def point(self, version: int) -> None:
        """Points CURRENT back at an already published version (undo of a failed swap)."""
        folder = self.folders.path(version)
        if not any(folder.glob("*.safetensors")):
            (self.root / MARKER).unlink(missing_ok=True)
            return
        self._point(version, folder)

    def _point(self, version: int, folder: Path) -> None:
        files = sorted(p.relative_to(self.root).as_posix() for p in folder.glob("*.safetensors"))
        self.folders.write_marker({"weights_version": version, "files": files})


@dataclass
class IncomingFile:
    """One file of a push being received: written at its offsets, hashed as it streams in."""

    path: Path
    size: int
    digest: str
    algorithm: str = SHA256
    received: int = 0
    _hash: object = None
    _in_order: bool = True
    _handle: object = None

    def __post_init__(self) -> None:
        try:
            self._hash = new_hasher(self.algorithm)
        except UnknownDigest as exc:
            raise WeightsRejected(f"manifest: {exc}") from None

    def write(self, offset: int, data: bytes) -> None:
        if offset + len(data) > self.size:
            raise WeightsRejected(
                f"{self.path.name}: chunk at {offset} runs past the size {self.size}"
            )
        if self._handle is None:
            # A recycled file (WeightsStore.staging) is overwritten in place, cut to size at the end.
            self._handle = open(self.path, "r+b" if self.path.exists() else "wb")  # noqa: SIM115 - held across chunks
        if offset != self.received:
            self._in_order = False  # hashed from the file at the end instead
        if self._in_order:
            self._hash.update(data)  # hashlib and blake3 release the GIL on large buffers
        else:
            self._handle.seek(offset)
        self._handle.write(data)
        self.received += len(data)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def finish(self) -> None:
        if self._handle is None:
            self._handle = open(self.path, "wb")  # noqa: SIM115 - closed below
        self._handle.truncate(self.size)
        self._handle.close()
        if self.received != self.size:
            raise WeightsRejected(
                f"{self.path.name}: received {self.received} bytes, manifest says {self.size}"
            )
        got = self._hash.hexdigest() if self._in_order else file_digest(self.path, self.algorithm)
        if got != self.digest.lower():
            raise WeightsRejected(
                f"{self.path.name}: {self.algorithm} {got} does not match the manifest's "
                f"{self.digest}"
            )


class ChunkWriter:
    """Writes and hashes chunks on a worker thread while the caller receives the next ones
    (hashlib, blake3 and file writes release the GIL, so the two overlap on two cores)."""

    def __init__(self, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weights-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            target, offset, data, release = item
            try:
                if self._error is None:
                    target.write(offset, data)
            except BaseException as exc:  # noqa: BLE001 - reported by close()
                self._error = exc
            finally:
                if release is not None:
                    release()

    def put(
        self, target: IncomingFile, offset: int, data, release: Callable[[], None] | None = None
    ) -> None:
        """Queues one write; `release` is called once `data` may be reused."""
        if self._error is not None:
            raise self._error
        self._queue.put((target, offset, data, release))

    def close(self) -> None:
        """Waits for every chunk to be written; raises the first write error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def receive_side_channel(
    conn: socket.socket, files: list[IncomingFile], block_bytes: int = 4 << 20
) -> int:
    """Reads `files` back to back from a side-channel connection (services/common/side_channel),
    exactly their sizes. Each file is sized first and mapped (`mmap`, pages populated up front):
    the socket's bytes land in the file's pages with the one copy `recv_into` makes, and a second
    thread hashes each block behind the socket (blake3 and hashlib release the GIL), so the hash
    ends a block after the transfer. Returns the bytes received."""
    received, total = 0, sum(f.size for f in files)
    for incoming in files:
        if incoming.size == 0:
            continue
        incoming._handle = open(incoming.path, "r+b" if incoming.path.exists() else "w+b")  # noqa: SIM115 - closed by finish()/close()
        incoming._handle.truncate(incoming.size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapped = mmap.mmap(incoming._handle.fileno(), incoming.size, flags=flags)
        blocks: queue.Queue = queue.Queue()
        hasher = threading.Thread(
            target=_hash_blocks, args=(incoming, mapped, blocks), name="weights-hasher", daemon=True
        )
        hasher.start()
        offset = 0
        try:
            with memoryview(mapped) as view:
                while offset < incoming.size:
                    end = min(offset + block_bytes, incoming.size)
                    with view[offset:end] as block:
                        filled = 0
                        while filled < len(block):
                            try:
                                n = conn.recv_into(block[filled:])
                            except OSError as exc:
                                raise WeightsRejected(f"side channel: {exc}") from None
                            if n == 0:
                                raise WeightsRejected(
                                    f"side channel closed after {received + offset + filled} "
                                    f"bytes of {total}"
                                )
                            filled += n
                    blocks.put((offset, end))
                    offset = end
        finally:
            blocks.put(None)
            hasher.join()
            mapped.close()
        incoming.received = offset
        received += offset
    return received


def _hash_blocks(incoming: IncomingFile, mapped: mmap.mmap, blocks: queue.Queue) -> None:
    """The hashing thread of `receive_side_channel`: the file's blocks in order, as they fill."""
    with memoryview(mapped) as view:
        while (span := blocks.get()) is not None:
            with view[span[0] : span[1]] as block:
                incoming._hash.update(block)
