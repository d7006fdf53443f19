"""The file digests the platform's manifests use.

- sha256: every manifest before BLAKE3 (checkpoints, reward versions, `rlhf.weights.v1`
  announcements), and what an older weights sender puts in `WeightsManifest.file_sha256`.
- BLAKE3: the weights push's digest (`WeightsManifest.digest_algorithm = "blake3"`). It is a
  cryptographic hash like sha256, measured 0.094 s for the 538 MB of SmolLM2-135M on one thread
  against sha256's 0.45 s, and the `blake3` package releases the GIL while it hashes, so a
  receiver hashes one block while its socket fills the next.

    hasher = new_hasher(BLAKE3)          # .update(buffer) as the bytes arrive, .hexdigest()
    file_digest(path, BLAKE3)            # the same digest of a whole file
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import blake3

SHA256 = "sha256"
BLAKE3 = "blake3"
ALGORITHMS = (SHA256, BLAKE3)

HASH_THREADS = 1
"""BLAKE3's threads per update. One keeps the hash beside a transfer on a 2-core machine from
competing with the copy it follows; `blake3.AUTO` suits a machine with idle cores."""


class UnknownDigest(ValueError):
    """A manifest names a digest algorithm this code does not implement."""


def new_hasher(algorithm: str, threads: int = HASH_THREADS):
    """An incremental hasher (`update`, `hexdigest`) for `algorithm`."""
    if algorithm == SHA256:
        return hashlib.sha256()
    if algorithm == BLAKE3:
        return blake3.blake3(max_threads=threads)
    raise UnknownDigest(f"digest algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")


def file_digest(path: Path, algorithm: str, threads: int = HASH_THREADS) -> str:
    """Hex digest of a file's bytes, hashed through mmap (a 540 MB model is never read into
    memory at once)."""
    hasher = new_hasher(algorithm, threads)
    with open(path, "rb") as f:
        if algorithm == SHA256:
            return hashlib.file_digest(f, SHA256).hexdigest()
        size = f.seek(0, 2)
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                hasher.update(mapped)
    return hasher.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (a 540 MB model is never held at once)."""
    return file_digest(path, SHA256)
