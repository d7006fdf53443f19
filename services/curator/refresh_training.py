"""The refresh's training and publishing: fine-tune a reward model on new plus replayed pairs,
write a version folder atomically, prune old ones. See refresh.py for the cycle it serves.

Shapes: `P` preference pairs.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.models import load_tokenizer
from services.trainer.checkpoint import fsync_dir
from services.trainer.offline.common import (
    make_optimizer,
    make_runtime,
    optimizer_step,
    save_model_folder,
    shuffled_batches,
)
from services.trainer.offline.data import PreferencePair
from services.trainer.offline.losses import LossName, get_loss
from services.trainer.offline.reward import (
    RewardConfig,
    held_out_metrics,
    load_reward_for_training,
    pair_rewards,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Fine-tuning, with the offline train-reward stage's functions


@dataclass
class Candidate:
    model: torch.nn.Module
    tokenizer: object
    before: dict[str, float]
    """Held-out metrics of the starting version: accuracy, margin, loss."""
    after: dict[str, float]
    """Held-out metrics of the fine-tuned model."""
    steps: int


def fine_tune(
    model_dir: Path,
    train: list[PreferencePair],
    held_out: list[PreferencePair],
    config: RewardConfig,
    rng: random.Random,
) -> Candidate:
    """Bradley-Terry fine-tuning of `model_dir` on `train`, evaluated on `held_out` around it."""
    runtime = make_runtime(config)
    tokenizer = load_tokenizer(model_dir)
    model = load_reward_for_training(model_dir, runtime.device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    before = held_out_metrics(model, tokenizer, held_out, config, runtime)
    optimizer = make_optimizer(model, config)
    bradley_terry = get_loss(LossName.BRADLEY_TERRY)
    steps = 0
    for _ in range(config.epochs):
        for chunk in shuffled_batches(train, config.batch_size, rng):
            chosen, rejected = pair_rewards(
                model, tokenizer, chunk, config.max_length, runtime
            )  # (P,), (P,)
            loss, _ = bradley_terry(chosen, rejected)
            optimizer_step(model, optimizer, loss, config.max_grad_norm)
            steps += 1
    after = held_out_metrics(model, tokenizer, held_out, config, runtime)
    return Candidate(model.eval(), tokenizer, before, after, steps)


def version_dir(root: Path, version: int) -> Path:
    return Path(root).resolve() / f"v{version:06d}"


def publish_folder(root: Path, version: int, candidate: Candidate, summary: dict) -> Path:
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
