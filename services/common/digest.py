"""The sha256 every manifest in the platform uses (weights pushes, checkpoints, reward versions)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (a 540 MB model is never held at once)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
