"""One store of numbered folders, used by every writer of versions: the policy's weights
(`v00000002/`), the trainer's pushed weights and its checkpoints (`step-00000012/`), and the
refresh's reward-model versions.

    <root>/<prefix>00000002/   one complete folder per number (8 digits; any count is read)
    <root>/.tmp-<prefix>...    a folder being written; never read, pruned once older than the newest
    <root>/CURRENT             a JSON marker naming what is served (its fields are the user's)

A folder is written under its temporary name, renamed into place and the root fsynced: a crash
leaves either the whole folder or a temporary one. The marker is replaced atomically (temporary
file, fsync, `os.replace`, fsync of the root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.digest import sha256_file

DIGITS = 8
MARKER = "CURRENT"
TEMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Writes `data` to `path` and fsyncs the file (the folder is made durable by its rename)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(folder: Path) -> None:
    """Fsyncs every file directly in `folder`, then the folder itself."""
    for file in Path(folder).iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def manifest(folder: Path) -> dict[str, str]:
    """The sha256 of every file in `folder` (what a publisher sends with a new version)."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


@dataclass
class VersionedFolders:
    """The numbered folders under `root` whose names start with `prefix`, and its marker."""

    root: Path
    prefix: str = "v"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._pattern = re.compile(re.escape(self.prefix) + r"(\d+)")

    def name(self, number: int) -> str:
        return f"{self.prefix}{number:0{DIGITS}d}"

    def path(self, number: int) -> Path:
        return self.root / self.name(number)

    def number(self, folder: Path) -> int | None:
        """The number a folder name carries, or None when it is not one of this store's."""
        match = self._pattern.fullmatch(Path(folder).name)
        return int(match.group(1)) if match else None

    def folders(self) -> list[tuple[int, Path]]:
        """Complete (renamed into place) folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(self.number(p), p) for p in self.root.iterdir() if p.is_dir()]
        return sorted((n, p) for n, p in found if n is not None)

    def temp(self, number: int) -> Path:
        return self.root / f"{TEMP_PREFIX}{self.name(number)}"

    def begin(self, number: int) -> Path:
        """An empty temporary folder for `number` (what a crash left there is removed)."""
        tmp = self.temp(number)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, number: int) -> Path:
        """Renames a written folder into place (replacing a folder of the same number, as a rerun
        after a crash writes) and fsyncs the root; returns the final path."""
        final = self.path(number)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.root)
        return final

    def write_marker(self, data: dict) -> None:
        tmp = self.root / f".{MARKER}.tmp{os.getpid()}"
        write_durable(tmp, json.dumps(data).encode())
        os.replace(tmp, self.root / MARKER)
        fsync_dir(self.root)

    def read_marker(self) -> dict | None:
        try:
            return json.loads((self.root / MARKER).read_text())
        except FileNotFoundError:
            return None

    def prune(self, keep: int, protect: Iterable[Path] = ()) -> None:
        """Keeps the `keep` newest folders and any in `protect`; removes the temporary folders of
        numbers up to the newest (a crash's leftovers; a newer one may still be being written)."""
        kept = self.folders()
        protected = {Path(p).resolve() for p in protect}
        for _, old in kept[: max(len(kept) - keep, 0)]:
            if old.resolve() not in protected:
                shutil.rmtree(old, ignore_errors=True)
        newest = kept[-1][0] if kept else -1
        for tmp in self.root.glob(f"{TEMP_PREFIX}{self.prefix}*"):
            number = self.number(Path(tmp.name.removeprefix(TEMP_PREFIX)))
            if number is not None and number <= newest:
                shutil.rmtree(tmp, ignore_errors=True)


# ---- the published version of a model that replicas follow (the refresh writes it, every reward
# replica reads it: services/reward/follower.py) ----------------------------------------------


@dataclass(frozen=True)
class Published:
    """The reward-model version a publisher wants served."""

    version: int
    path: Path
    file_sha256: dict[str, str]


def write_published(root: Path, version: int, folder: Path, file_sha256: dict[str, str]) -> None:
    """Points `root/CURRENT` at `folder`. A folder inside `root` is stored by its name, so
    readers may mount the volume at another path."""
    root, folder = Path(root).resolve(), Path(folder).resolve()
    where = folder.name if folder.parent == root else str(folder)
    VersionedFolders(root).write_marker(
        {"reward_model_version": int(version), "path": where, "file_sha256": dict(file_sha256)}
    )


def read_published(root: Path) -> Published | None:
    """What `root/CURRENT` names, or None when nothing was published there."""
    data = VersionedFolders(root).read_marker()
    if data is None:
        return None
    return Published(
        int(data["reward_model_version"]), Path(root) / data["path"], dict(data["file_sha256"])
    )
