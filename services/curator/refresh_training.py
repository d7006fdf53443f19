"""The refresh's publishing: write a version folder atomically, prune old ones (the training is
the offline stage's `fit_reward`). See refresh.py for the cycle it serves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from services.trainer.checkpoint import fsync_dir
from services.trainer.offline.common import save_model_folder
from services.trainer.offline.reward import FittedReward


def version_dir(root: Path, version: int) -> Path:
    return Path(root).resolve() / f"v{version:06d}"


def publish_folder(root: Path, version: int, candidate: FittedReward, summary: dict) -> Path:
    """Writes the version folder atomically (temp sibling, fsync, rename) and returns its path."""
    path = save_model_folder(
        version_dir(root, version), candidate.model, candidate.tokenizer, summary, overwrite=True
    )  # a folder left by a crash before the record
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(path)
    fsync_dir(path.parent)
    return path


def prune_versions(root: Path, keep: int, current: Path) -> None:
    """Removes all but the `keep` newest version folders (never the current one)."""
    folders = sorted((p for p in Path(root).glob("v[0-9]*") if p.is_dir()), reverse=True)
    for old in folders[keep:]:
        if old.resolve() != Path(current).resolve():
            shutil.rmtree(old, ignore_errors=True)
