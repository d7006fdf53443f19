"""`rlhf train-reward`: a scalar reward model from preference pairs and rankings (Bradley-Terry).

    python -m services.cli train-reward --data preferences.jsonl --output runs/rm-1 \
        [--model FOLDER] [--eval-data held_out.jsonl] [--config rm.yaml]

Data: `prompt`/`chosen`/`rejected` pairs and `prompt`/`responses` rankings (best first), a
ranking counting as its K(K-1)/2 ordered pairs (data.py), each optionally naming its `source`
(human or ai) and annotator `cohort`. The model is a sequence classifier with `ensemble_size`
outputs on one shared backbone, by default fresh heads on the MiniLM-L6 encoder; it reads
(prompt, response) through `encoding.encode_for_reward`, the function the reward service scores
with. The reward is the mean over heads; their spread (population std) is its uncertainty.

Training, per step:
  1. every pair's weight per member: its bootstrap count (Poisson(1), drawn once per (pair,
     member) from `seed`; all 1 with one head) times `human_weight` or `ai_weight` by source;
  2. one forward over the batch's 2P responses gives every head's rewards;
  3. loss: each member's weighted Bradley-Terry loss, mean over members (losses.py).
Reports held-out pairwise accuracy of the ensemble mean (share of pairs with r_chosen >
r_rejected; a tie counts as wrong), each member's accuracy and the mean spread; per annotator
cohort the held-out pairs, their share of the training pairs and the accuracy; and how often
cohorts, and AI and human labellers, agree on the same comparison (data.label_agreement).

Shapes: `P` preference pairs, `T` tokens, `M` ensemble members (heads).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.common.models import load_tokenizer, minilm_dir
from services.common.training.data import (
    DataKind,
    PreferencePair,
    human_cohort,
    label_agreement,
    source_of,
)
from services.common.training.encoding import reward_batch
from services.common.training.losses import LossName, get_loss
from services.common.training.stage import (
    ConfigError,
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

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RewardConfig(StageConfig):
    model: Path = field(default_factory=minilm_dir)
    """Folder to start from: a sequence classifier, or an encoder that gets fresh heads (default MiniLM-L6)."""
    learning_rate: float = 3e-5
    """AdamW learning rate (constant)."""
    batch_size: int = 16
    """Preference pairs per optimizer step."""
    max_length: int = 512
    """Longest (prompt, response) token pair; the longer of the two is truncated first."""
    ensemble_size: int = 1
    """Reward heads on the shared backbone, each trained on its own bootstrap sample (1: one model on all pairs)."""
    human_weight: float = 1.0
    """Loss weight of a human-labelled pair (relative to `ai_weight`)."""
    ai_weight: float = 1.0
    """Loss weight of an AI-labelled pair (RLAIF); 0 trains on the human pairs alone."""

    def validate(self) -> None:
        checks = {
            "ensemble_size": self.ensemble_size >= 1,
            "human_weight": self.human_weight >= 0,
            "ai_weight": self.ai_weight >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"config field '{name}' has an invalid value {getattr(self, name)!r}"
                )
        if self.human_weight == 0 and self.ai_weight == 0:
            raise ConfigError("config fields 'human_weight' and 'ai_weight' are both 0")
        super().validate()


def saved_heads(path: Path) -> int | None:
    """Heads of the sequence classifier saved in `path`; None when it is a bare encoder."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return int(config.num_labels)
    return None


def load_reward_for_training(path: Path, device: torch.device, ensemble_size: int = 1):
    """A float32 sequence classifier with `ensemble_size` outputs. An encoder gets fresh heads; a
    classifier with another head count keeps its backbone and gets fresh heads (logged)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    heads = saved_heads(path)
    replace = heads is not None and heads != ensemble_size
    if replace:
        log.warning(
            "reward model heads replaced",
            extra={"fields": {"model": str(path), "saved": heads, "training": ensemble_size}},
        )
    config = AutoConfig.from_pretrained(str(path))
    config.num_labels = ensemble_size  # also resets id2label, which the saved config sizes by
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path),
        config=config,
        dtype=torch.float32,
        use_safetensors=True,
        ignore_mismatched_sizes=replace,
    )
    return model.to(device).train()


def bootstrap_weights(pair_count: int, members: int, seed: int) -> torch.Tensor:
    """(P, M) float32: member j's bootstrap count of pair i, Poisson(1), drawn once from `seed`.

    Poisson(1) counts are the large-P limit of a multinomial resample of P pairs (the online
    bootstrap of Oza & Russell), and need no pass over the data. One member needs no bootstrap:
    it trains on every pair once (all ones), exactly as a single reward model does.
    """
    if members == 1:
        return torch.ones(pair_count, 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.ones(pair_count, members), generator=generator)  # (P, M)


def source_weights(pairs: list[PreferencePair], config: RewardConfig) -> torch.Tensor:
    """(P,) each pair's loss weight by who labelled it: `human_weight` or `ai_weight`."""
    weight = {"human": config.human_weight, "ai": config.ai_weight}
    return torch.tensor([weight[p.source] for p in pairs], dtype=torch.float32)


def pair_rewards(model, tokenizer, pairs: list[PreferencePair], max_length: int, runtime: Runtime):
    """(chosen rewards (P, M), rejected rewards (P, M)) from one forward over the 2P responses."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    inputs = {
        k: v.to(runtime.device)
        for k, v in reward_batch(tokenizer, prompts, responses, max_length).items()
    }
    with runtime.autocast():
        rewards = model(**inputs).logits.float()  # (2P, M)
    return rewards[: len(pairs)], rewards[len(pairs) :]


@torch.no_grad()
def held_out_rewards(
    model, tokenizer, pairs: list[PreferencePair], config: RewardConfig, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (P, M), rejected (P, M)) rewards of every held-out pair, in eval mode."""
    model.eval()
    chosen, rejected = [], []
    for chunk in progress(
        in_batches(pairs, config.batch_size), "reward eval", -(-len(pairs) // config.batch_size)
    ):
        c, r = pair_rewards(model, tokenizer, chunk, config.max_length, runtime)
        chosen.append(c)
        rejected.append(r)
    model.train()
    return torch.cat(chosen), torch.cat(rejected)


def ensemble_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy, margin and loss of the ensemble mean; with several heads also the mean spread
    and `member_<j>_accuracy` (one head: the three keys a single reward model always reported)."""
    _, metrics = get_loss(LossName.BRADLEY_TERRY_ENSEMBLE)(chosen, rejected)
    out = {
        "accuracy": metrics["reward/accuracy"],
        "margin": metrics["reward/margin"],
        "loss": metrics["reward/loss"],
    }
    if chosen.shape[-1] > 1:
        out["spread"] = metrics["reward/spread"]
        for j in range(chosen.shape[-1]):
            out[f"member_{j}_accuracy"] = metrics[f"reward/member_{j}/accuracy"]
    return out


def held_out_report(
    model, tokenizer, pairs: list[PreferencePair], config: RewardConfig, runtime: Runtime
) -> tuple[dict[str, float], list[bool]]:
    """`ensemble_metrics` over all held-out pairs, and per pair whether the ensemble mean ranks
    chosen above rejected (a tie counts as wrong)."""
    chosen, rejected = held_out_rewards(model, tokenizer, pairs, config, runtime)
    right = (chosen.mean(dim=-1) > rejected.mean(dim=-1)).tolist()
    return ensemble_metrics(chosen, rejected), right


COHORT_UNKNOWN = "unknown"
"""The report's name for pairs without a cohort."""


def cohort_report(
    train: list[PreferencePair], held_out: list[PreferencePair], correct: list[bool]
) -> dict[str, dict]:
    """Per cohort: held-out pairs, their training pairs' share of all training pairs, and the
    held-out accuracy (`correct[i]`: the model ranks held-out pair i right; None without any).

    Cohorts are those of either side; a pair without one counts as COHORT_UNKNOWN.
    """

    def name(pair: PreferencePair) -> str:
        return pair.cohort or COHORT_UNKNOWN

    report: dict[str, dict] = {}
    for cohort in sorted({name(p) for p in train} | {name(p) for p in held_out}):
        right = [c for p, c in zip(held_out, correct, strict=True) if name(p) == cohort]
        trained = sum(name(p) == cohort for p in train)
        report[cohort] = {
            "held_out_pairs": len(right),
            "train_pairs": trained,
            "train_share": trained / len(train) if train else 0.0,
            "accuracy": sum(right) / len(right) if right else None,
        }
    return report


def agreement_report(pairs: list[PreferencePair]) -> dict[str, dict]:
    """Inter-cohort (human labels of different cohorts) and judge-human (AI against human)
    agreement on the same (prompt, unordered answer pair), over `pairs`."""
    report = {}
    for key, group in (("inter_cohort", human_cohort), ("ai_human", source_of)):
        agreement = label_agreement(pairs, group)
        report[key] = {
            "label_pairs": agreement.label_pairs,
            "agreeing": agreement.agreeing,
            "share": agreement.share,
        }
    return report


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
    ensemble_size: int = 1
    """Heads of the trained model (its config's num_labels)."""
    cohorts: dict[str, dict] = field(default_factory=dict)
    """`cohort_report` of the trained model ({} without held-out pairs)."""
    correct_before: list[bool] = field(default_factory=list)
    """Per held-out pair: `config.model` ranks it right (a tie counts as wrong)."""
    correct_after: list[bool] = field(default_factory=list)
    """The same, after training: with `correct_before`, the pairs whose ranking changed."""


def fit_reward(
    config: RewardConfig,
    train: list[PreferencePair],
    held_out: list[PreferencePair],
    runtime: Runtime,
    rng: random.Random,
) -> FittedReward:
    """Bradley-Terry training of `config.model` on `train` (-log sigmoid(r_chosen - r_rejected)
    per head, weighted, see the module docstring), evaluated on `held_out` before and after:
    `rlhf train-reward`, and each reward refresh (services/refresh) on live pairs."""
    tokenizer = load_tokenizer(config.model)
    members = config.ensemble_size
    model = load_reward_for_training(config.model, runtime.device, members)
    if model.config.pad_token_id is None:  # decoder backbones find the last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    # 1. Pair weights (P, M), fixed for the whole run: bootstrap counts times source weights.
    weights = bootstrap_weights(len(train), members, config.seed) * source_weights(
        train, config
    ).unsqueeze(-1)
    if not weights.sum() > 0:
        raise ConfigError(
            "every training pair has weight 0 "
            f"(human_weight={config.human_weight}, ai_weight={config.ai_weight})"
        )
    weights = weights.to(runtime.device)
    optimizer = make_optimizer(model, config)
    bradley_terry = get_loss(LossName.BRADLEY_TERRY_ENSEMBLE)
    before, correct_before = {}, []
    if held_out:
        before, correct_before = held_out_report(model, tokenizer, held_out, config, runtime)
    steps, last_loss = 0, None
    for epoch in range(config.epochs):
        # Batches of indices into `train` (the same shuffle as of the pairs), for the weights.
        batches = progress(
            shuffled_batches(list(range(len(train))), config.batch_size, rng),
            f"reward epoch {epoch + 1}/{config.epochs}",
        )
        for index in batches:
            # 2. every head's rewards, 3. the weighted loss, mean over members
            chunk = [train[i] for i in index]
            chosen, rejected = pair_rewards(model, tokenizer, chunk, config.max_length, runtime)
            loss, step_metrics = bradley_terry(chosen, rejected, weights[index])
            optimizer_step(model, optimizer, loss, config.max_grad_norm)
            steps += 1
            last_loss = step_metrics["reward/loss"]
            batches.set_postfix(
                loss=f"{step_metrics['reward/loss']:.4f}",
                acc=f"{step_metrics['reward/accuracy']:.2f}",
            )
    after, cohorts, correct_after = {}, {}, []
    if held_out:
        after, correct_after = held_out_report(model, tokenizer, held_out, config, runtime)
        cohorts = cohort_report(train, held_out, correct_after)
    return FittedReward(
        model.eval(),
        tokenizer,
        before,
        after,
        steps,
        last_loss,
        members,
        cohorts,
        correct_before,
        correct_after,
    )


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
    summary["ensemble_size"] = fitted.ensemble_size  # = the saved config's num_labels
    summary["cohorts"] = fitted.cohorts
    summary["agreement"] = agreement_report(train + held_out)
    save_model_folder(config.output, fitted.model, fitted.tokenizer, summary, config.overwrite)
    return summary
