"""The refresh's publishing: write a version folder atomically, prune old ones (the training is
the offline stage's `fit_reward`). See worker.py for the cycle it serves. The folders are the
shared versioned store's (services.common.versions): `versions_root/v00000002/`.
"""

from __future__ import annotations

from pathlib import Path

from services.common.training.reward import FittedReward
from services.common.training.stage import save_model_folder
from services.common.versions import VersionedFolders, fsync_dir, fsync_tree


def version_dir(root: Path, version: int) -> Path:
    return VersionedFolders(Path(root).resolve()).path(version)


def publish_folder(root: Path, version: int, candidate: FittedReward, summary: dict) -> Path:
    """Writes the version folder atomically (temp sibling, fsync, rename) and returns its path."""
    path = save_model_folder(
        version_dir(root, version), candidate.model, candidate.tokenizer, summary, overwrite=True
    )  # a folder left by a crash before the record
    fsync_tree(path)
    fsync_dir(path.parent)
    return path


def prune_versions(root: Path, keep: int, current: Path) -> None:
    """Removes all but the `keep` newest version folders (never the current one)."""
    VersionedFolders(root).prune(keep, protect=[current])
