"""Checks a published reward-model version before it may replace the served one.

Pure functions of files and bytes, used by the Triton model when it is told to reload:
1. every file in the folder is listed in the manifest, and every listed file's sha256 matches
   (an unlisted tokenizer or config could change scores as surely as new weights);
2. the safetensors tensors have the same names, shapes and dtypes as the served version's
   (read from the files' JSON headers, so a wrong architecture is refused before any weight is
   loaded).
Any failure raises `CheckpointRefused` whose message is the reason reported to the caller.

(The publisher's pointer, `CURRENT` in the folder of published versions, is
services.common.versions.write_published / read_published: the refresh writes it before it sends
ReloadModel; a reward service that missed the call reads it, see services/reward/follower.)
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from services.common.safetensors_header import (
    HeaderError,
    TensorSpecs,
    bytes_specs,
    differences,
    file_specs,
    merged_specs,
    summary,
)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class CheckpointRefused(ValueError):
    """The new version fails a check; the message says which and why."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(folder: Path, file_sha256: dict[str, str]) -> dict[str, bytes]:
    """The bytes of every file in `folder`, each checked against the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointRefused(f"path {folder} is not a folder")
    if not file_sha256:
        raise CheckpointRefused("the manifest lists no files")
    present = {p.name for p in folder.iterdir() if p.is_file()}
    unlisted = sorted(present - set(file_sha256))
    if unlisted:
        raise CheckpointRefused(f"files not in the manifest: {', '.join(unlisted)}")
    contents: dict[str, bytes] = {}
    for name, expected in sorted(file_sha256.items()):
        if "/" in name or name in ("", ".", ".."):
            raise CheckpointRefused(f"manifest name {name!r} is not a plain file name")
        if name not in present:
            raise CheckpointRefused(f"{name} is listed but missing from {folder}")
        data = (folder / name).read_bytes()
        actual = sha256_bytes(data)
        if actual != expected.lower():
            raise CheckpointRefused(
                f"sha256 mismatch for {name}: expected {expected}, got {actual}"
            )
        contents[name] = data
    return contents


def folder_specs(contents: dict[str, bytes]) -> TensorSpecs:
    """Specs of all the safetensors files of one version (shards included), from their bytes."""
    shards = {
        name: data for name, data in sorted(contents.items()) if name.endswith(".safetensors")
    }
    if not shards:
        raise CheckpointRefused("no .safetensors weights in the folder")
    try:
        return merged_specs(bytes_specs(data, name) for name, data in shards.items())
    except HeaderError as error:
        raise CheckpointRefused(str(error)) from None


def served_specs(folder: Path) -> TensorSpecs:
    """Specs of the version being served, from the headers of its files on disk."""
    return merged_specs(file_specs(p) for p in sorted(Path(folder).glob("*.safetensors")))


def compare_specs(served: TensorSpecs, new: TensorSpecs, limit: int = 3) -> None:
    """Raises naming the first differences when the new tensors do not match the served ones."""
    problems = differences(served, new)
    if problems:
        raise CheckpointRefused(
            f"tensors do not match the served model: {summary(problems, limit)}"
        )
