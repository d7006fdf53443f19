"""`rlhf train-reward`: a scalar reward model from preference pairs and rankings (Bradley-Terry).

    python -m services.cli train-reward --data preferences.jsonl --output runs/rm-1 \
        [--model FOLDER] [--eval-data held_out.jsonl] [--config rm.yaml]

Data: `prompt`/`chosen`/`rejected` pairs and `prompt`/`responses` rankings (best first), a
ranking counting as its K(K-1)/2 ordered pairs (data.py). The model is a sequence classifier with
one output, by default a fresh scalar head on the MiniLM-L6 encoder; it reads (prompt, response)
through `encoding.encode_for_reward`, the function the reward service scores with. Reports
held-out pairwise accuracy (share of pairs with r_chosen > r_rejected; a tie counts as wrong).

Shapes: `P` preference pairs, `T` tokens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.common.models import load_tokenizer, minilm_dir
from services.common.training.data import DataKind, PreferencePair
from services.common.training.encoding import reward_batch
from services.common.training.losses import LossName, get_loss
from services.common.training.stage import (
    Runtime,
    StageConfig,
    build_summary,
    in_batches,
    load_split,
    make_optimizer,
    make_runtime,
    optimizer_step,
    progress,
    save_model_folder,
    shuffled_batches,
)


@dataclass(kw_only=True)
class RewardConfig(StageConfig):
    model: Path = field(default_factory=minilm_dir)
    """Folder to start from: a sequence classifier, or an encoder that gets a fresh scalar head (default MiniLM-L6)."""
    learning_rate: float = 3e-5
    """AdamW learning rate (constant)."""
    batch_size: int = 16
    """Preference pairs per optimizer step."""
    max_length: int = 512
    """Longest (prompt, response) token pair; the longer of the two is truncated first."""


def load_reward_for_training(path: Path, device: torch.device):
    """A float32 sequence classifier with one output; a missing head is initialised fresh."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=torch.float32, use_safetensors=True
    )
    return model.to(device).train()


def pair_rewards(model, tokenizer, pairs: list[PreferencePair], max_length: int, runtime: Runtime):
    """(chosen rewards (P,), rejected rewards (P,)) from one forward over the 2P responses."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    inputs = {
        k: v.to(runtime.device)
        for k, v in reward_batch(tokenizer, prompts, responses, max_length).items()
    }
    with runtime.autocast():
        rewards = model(**inputs).logits.squeeze(-1).float()  # (2P,)
    return rewards[: len(pairs)], rewards[len(pairs) :]


@torch.no_grad()
def held_out_metrics(
    model, tokenizer, pairs: list[PreferencePair], config: RewardConfig, runtime: Runtime
) -> dict[str, float]:
    """Pairwise accuracy, mean margin and Bradley-Terry loss over all held-out pairs."""
    model.eval()
    chosen, rejected = [], []
    for chunk in progress(
        in_batches(pairs, config.batch_size), "reward eval", -(-len(pairs) // config.batch_size)
    ):
        c, r = pair_rewards(model, tokenizer, chunk, config.max_length, runtime)
        chosen.append(c)
        rejected.append(r)
    model.train()
    _, metrics = get_loss(LossName.BRADLEY_TERRY)(torch.cat(chosen), torch.cat(rejected))
    return {
        "accuracy": metrics["reward/accuracy"],
        "margin": metrics["reward/margin"],
        "loss": metrics["reward/loss"],
    }


@dataclass
class FittedReward:
    """A reward model fine-tuned by `fit_reward`, with held-out metrics around the training."""

    model: torch.nn.Module
    tokenizer: Any
    before: dict[str, float]
    """Held-out accuracy, margin and loss of `config.model` ({} without held-out pairs)."""
    after: dict[str, float]
    """The same, after training."""
    steps: int
    last_loss: float | None
    """Bradley-Terry loss of the last optimizer step."""


def fit_reward(
    config: RewardConfig,
    train: list[PreferencePair],
    held_out: list[PreferencePair],
    runtime: Runtime,
    rng: random.Random,
) -> FittedReward:
    """Bradley-Terry training of `config.model` on `train` (-log sigmoid(r_chosen - r_rejected)),
    evaluated on `held_out` before and after: `rlhf train-reward`, and each reward refresh
    (services/refresh) on live pairs."""
    tokenizer = load_tokenizer(config.model)
    # A sequence classifier with one scalar output.
    model = load_reward_for_training(config.model, runtime.device)
    if model.config.pad_token_id is None:  # decoder backbones find the last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = make_optimizer(model, config)
    bradley_terry = get_loss(LossName.BRADLEY_TERRY)
    before = held_out_metrics(model, tokenizer, held_out, config, runtime) if held_out else {}
    steps, last_loss = 0, None
    for epoch in range(config.epochs):
        batches = progress(
            shuffled_batches(train, config.batch_size, rng),
            f"reward epoch {epoch + 1}/{config.epochs}",
        )
        for chunk in batches:
            chosen, rejected = pair_rewards(model, tokenizer, chunk, config.max_length, runtime)
            loss, step_metrics = bradley_terry(chosen, rejected)
            optimizer_step(model, optimizer, loss, config.max_grad_norm)
            steps += 1
            last_loss = step_metrics["reward/loss"]
            batches.set_postfix(
                loss=f"{step_metrics['reward/loss']:.4f}",
                acc=f"{step_metrics['reward/accuracy']:.2f}",
            )
    after = held_out_metrics(model, tokenizer, held_out, config, runtime) if held_out else {}
    return FittedReward(model.eval(), tokenizer, before, after, steps, last_loss)


def run_train_reward(config: RewardConfig) -> dict:
    config.validate()
    started = time.time()
    runtime = make_runtime(config)
    rng = random.Random(config.seed)

    # 1. Data: pairs, rankings expanded to pairs; held-out split by prompt, so a ranking's pairs
    #    never sit on both sides.
    train, held_out, provenance = load_split(config, DataKind.PREFERENCE, chat_allowed=False)

    # 2-3. Model and training, held-out pairwise accuracy before and after.
    fitted = fit_reward(config, train, held_out, runtime, rng)
    metrics = (
        {f"eval/{k}_before": v for k, v in fitted.before.items()}
        | {"train/loss_last": fitted.last_loss}
        | {f"eval/{k}_after": v for k, v in fitted.after.items()}
    )

    # 4. The folder the reward service loads.
    summary = build_summary("train-reward", config, metrics, provenance, started, fitted.steps)
    save_model_folder(config.output, fitted.model, fitted.tokenizer, summary, config.overwrite)
    return summary
