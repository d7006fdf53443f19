"""`rlhf dpo`: direct preference optimisation of a causal LM on chosen/rejected pairs.

    python -m services.cli dpo --model runs/sft-1 --data preferences.jsonl --output runs/dpo-1 \
        [--eval-data held_out.jsonl] [--config dpo.yaml]   # YAML keys: beta, loss (dpo|ipo), ...

The reference is a frozen copy of the starting model. Each step scores prompt+chosen and
prompt+rejected under policy and reference and applies the registered preference loss
(`loss: dpo` or `ipo`, losses.py). Rankings are accepted too, as their ordered pairs.

Reports on held-out pairs, before and after: the implicit reward margin
beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)), which is 0 before
training by construction, its accuracy (share of pairs with margin > 0), and the
reference-free log-prob margin log pi(chosen) - log pi(rejected).

Shapes: `P` pairs.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.common.training.data import DataError, DataKind
from services.common.training.encoding import encode_completion
from services.common.training.losses import LossName, get_loss
from services.common.training.stage import (
    ConfigError,
    Runtime,
    StageConfig,
    build_summary,
    frozen_copy,
    in_batches,
    load_split,
    make_optimizer,
    make_runtime,
    optimizer_step,
    progress,
    save_model_folder,
    sequence_logps,
    shuffled_batches,
)

PREFERENCE_LOSSES = (LossName.DPO.value, LossName.IPO.value)


@dataclass(kw_only=True)
class DPOConfig(StageConfig):
    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference (larger stays closer)."""
    loss: str = "dpo"
    """Preference loss from the registry: `dpo` (sigmoid) or `ipo` (squared)."""
    learning_rate: float = 1e-6
    """AdamW learning rate (constant)."""

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"config field 'beta' must be positive, got {self.beta!r}")
        if self.loss not in PREFERENCE_LOSSES:
            raise ConfigError(
                f"config field 'loss' must be one of {PREFERENCE_LOSSES}, got {self.loss!r}"
            )


def encode_pairs(tokenizer, pairs: list, max_length: int, source: str) -> list[tuple]:
    """(chosen, rejected) EncodedCompletion for each pair, both after the same prompt."""
    encoded = []
    for index, pair in enumerate(pairs):
        try:
            encoded.append(
                (
                    encode_completion(tokenizer, pair.prompt, pair.chosen, max_length),
                    encode_completion(tokenizer, pair.prompt, pair.rejected, max_length),
                )
            )
        except ValueError as err:
            raise DataError(f"{source} record {index + 1}: {err}") from err
    return encoded


def pair_logps(model, encoded_pairs: list[tuple], pad_token_id: int, runtime: Runtime):
    """(chosen logps (P,), rejected logps (P,)) from one forward over the 2P sequences."""
    sequences = [c for c, _ in encoded_pairs] + [r for _, r in encoded_pairs]
    logps = sequence_logps(model, sequences, pad_token_id, runtime)  # (2P,)
    return logps[: len(encoded_pairs)], logps[len(encoded_pairs) :]


@torch.no_grad()
def held_out_margins(
    policy, reference, encoded_pairs, pad_token_id, config: DPOConfig, runtime: Runtime
) -> dict[str, float]:
    policy.eval()
    rows = []
    for chunk in progress(
        in_batches(encoded_pairs, config.batch_size),
        "dpo eval",
        -(-len(encoded_pairs) // config.batch_size),
    ):
        rows.append(
            (
                *pair_logps(policy, chunk, pad_token_id, runtime),
                *pair_logps(reference, chunk, pad_token_id, runtime),
            )
        )
    policy.train()
    policy_c, policy_r, ref_c, ref_r = (torch.cat(column) for column in zip(*rows))  # each (P,)
    margin = config.beta * ((policy_c - ref_c) - (policy_r - ref_r))  # (P,)
    return {
        "reward_margin": margin.mean().item(),
        "reward_accuracy": (margin > 0).float().mean().item(),
        "logp_margin": (policy_c - policy_r).mean().item(),
    }


def run_dpo(config: DPOConfig) -> dict:
    config.validate()
    started = time.time()
    runtime = make_runtime(config)
    rng = random.Random(config.seed)

    # 1. Data: each pair tokenized twice, prompt+chosen and prompt+rejected.
    train, held_out, provenance = load_split(config, DataKind.PREFERENCE)
    tokenizer = load_tokenizer(config.model)
    pad = tokenizer.pad_token_id
    train_pairs = encode_pairs(tokenizer, train, config.max_length, str(config.data))
    eval_pairs = encode_pairs(
        tokenizer, held_out, config.max_length, str(config.eval_data or config.data)
    )

    # 2. Policy (trained) and reference (a frozen copy of the same starting weights).
    policy = load_causal_lm(config.model, runtime.device, torch.float32).train()
    reference = frozen_copy(policy)
    optimizer = make_optimizer(policy, config)
    preference_loss = get_loss(config.loss)
    metrics: dict[str, float] = {}
    if eval_pairs:
        before = held_out_margins(policy, reference, eval_pairs, pad, config, runtime)
        metrics |= {f"eval/{k}_before": v for k, v in before.items()}

    # 3. Train: sequence log-probs under both models, then the preference loss.
    steps = 0
    for epoch in range(config.epochs):
        batches = progress(
            shuffled_batches(train_pairs, config.batch_size, rng),
            f"dpo epoch {epoch + 1}/{config.epochs}",
        )
        for chunk in batches:
            policy_chosen, policy_rejected = pair_logps(policy, chunk, pad, runtime)  # (P,), (P,)
            with torch.no_grad():
                ref_chosen, ref_rejected = pair_logps(reference, chunk, pad, runtime)  # (P,), (P,)
            loss, step_metrics = preference_loss(
                policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta
            )
            optimizer_step(policy, optimizer, loss, config.max_grad_norm)
            steps += 1
            batches.set_postfix(
                loss=f"{loss.item():.4f}", margin=f"{step_metrics['rewards/margin']:.3f}"
            )
        metrics["train/loss_last"] = loss.item()

    # 4. Held-out margins after, then the folder the policy service loads.
    if eval_pairs:
        after = held_out_margins(policy, reference, eval_pairs, pad, config, runtime)
        metrics |= {f"eval/{k}_after": v for k, v in after.items()}
    summary = build_summary("dpo", config, metrics, provenance, started, steps)
    save_model_folder(config.output, policy.eval(), tokenizer, summary, config.overwrite)
    return summary
