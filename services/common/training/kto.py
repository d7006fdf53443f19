"""`rlhf kto`: KTO (Ethayarajh et al. 2024) on binary labels, the natural use of thumbs up/down.

    python -m services.cli kto --model runs/sft-1 --data thumbs.jsonl --output runs/kto-1 \
        [--eval-data held_out.jsonl] [--config kto.yaml]   # YAML: beta, desirable_weight, ...

Data: `prompt`/`completion`/`label` (bool, true = desirable). The reference is a frozen copy of
the starting model.

The KL reference point z0 is estimated as in the paper (and TRL): from mismatched pairs of the
same batch, each prompt x_i with the completion of the next record y_(i+1 mod B), as
z0 = max(0, mean(log pi(y_j|x_i) - log pi_ref(y_j|x_i))), detached. So a batch needs two or
more records (`batch_size` >= 2; a trailing single record joins the batch before it). The
paper advises weights with w_d * n_desirable / (w_u * n_undesirable) in [1, 4/3].

Reports on held-out records, before and after: the log-prob gap
mean log pi(desirable) - mean log pi(undesirable), and the implicit reward gap (same with
beta * (log pi - log pi_ref), 0 before training by construction).

Shapes: `B` batch.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.common.training.data import DataError, DataKind, LabelledCompletion
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


@dataclass(kw_only=True)
class KTOConfig(StageConfig):
    beta: float = 0.1
    """Strength of the KL constraint to the reference."""
    desirable_weight: float = 1.0
    """Weight lambda_D of desirable (thumbs-up) records' losses."""
    undesirable_weight: float = 1.0
    """Weight lambda_U of undesirable (thumbs-down) records' losses."""
    learning_rate: float = 1e-6
    """AdamW learning rate (constant)."""

    def validate(self) -> None:
        super().validate()
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"config field '{name}' must be positive, got {getattr(self, name)!r}"
                )
        if self.batch_size < 2:
            raise ConfigError(
                "config field 'batch_size' must be at least 2: KTO's KL estimate pairs records of a batch"
            )


def encode_batch(tokenizer, records: list[LabelledCompletion], max_length: int, source: str):
    """(matched sequences x_i + y_i, mismatched x_i + y_(i+1 mod B)), B each."""
    try:
        matched = [
            encode_completion(tokenizer, r.prompt, r.completion, max_length) for r in records
        ]
        shifted = records[1:] + records[:1]
        mismatched = [
            encode_completion(tokenizer, r.prompt, s.completion, max_length)
            for r, s in zip(records, shifted)
        ]
    except ValueError as err:
        raise DataError(f"{source}: {err}") from err
    return matched, mismatched


@torch.no_grad()
def held_out_gaps(
    policy, reference, tokenizer, records, config: KTOConfig, runtime: Runtime
) -> dict[str, float]:
    policy.eval()
    policy_logps, ref_logps = [], []
    for chunk in progress(
        in_batches(records, config.batch_size), "kto eval", -(-len(records) // config.batch_size)
    ):
        encoded = [
            encode_completion(tokenizer, r.prompt, r.completion, config.max_length) for r in chunk
        ]
        policy_logps.append(sequence_logps(policy, encoded, tokenizer.pad_token_id, runtime))
        ref_logps.append(sequence_logps(reference, encoded, tokenizer.pad_token_id, runtime))
    policy.train()
    logps, rewards = (
        torch.cat(policy_logps),
        config.beta * (torch.cat(policy_logps) - torch.cat(ref_logps)),
    )  # (N,)
    desirable = torch.tensor([r.label for r in records], device=logps.device)  # (N,)
    if desirable.all() or not desirable.any():
        return {}  # a gap needs both kinds
    return {
        "logp_gap": (logps[desirable].mean() - logps[~desirable].mean()).item(),
        "reward_gap": (rewards[desirable].mean() - rewards[~desirable].mean()).item(),
    }


def run_kto(config: KTOConfig) -> dict:
    config.validate()
    started = time.time()
    runtime = make_runtime(config)
    rng = random.Random(config.seed)

    # 1. Data: labelled completions; tokenized per batch, since the mismatched pairs depend on it.
    train, held_out, provenance = load_split(config, DataKind.LABELLED)
    if len(train) < 2:
        raise DataError(f"{config.data}: KTO needs at least 2 training records")
    provenance["train"]["desirable"] = sum(r.label for r in train)
    tokenizer = load_tokenizer(config.model)
    pad = tokenizer.pad_token_id

    # 2. Policy (trained) and reference (a frozen copy of the same starting weights).
    policy = load_causal_lm(config.model, runtime.device, torch.float32).train()
    reference = frozen_copy(policy)
    optimizer = make_optimizer(policy, config)
    kto = get_loss(LossName.KTO)
    metrics: dict[str, float] = {}
    if held_out:
        metrics |= {
            f"eval/{k}_before": v
            for k, v in held_out_gaps(
                policy, reference, tokenizer, held_out, config, runtime
            ).items()
        }

    # 3. Train: log-probs of matched and mismatched sequences under both models, then KTO.
    steps = 0
    for epoch in range(config.epochs):
        batches = progress(
            shuffled_batches(train, config.batch_size, rng),
            f"kto epoch {epoch + 1}/{config.epochs}",
        )
        for chunk in batches:
            matched, mismatched = encode_batch(
                tokenizer, chunk, config.max_length, str(config.data)
            )
            policy_logps = sequence_logps(policy, matched, pad, runtime)  # (B,)
            with torch.no_grad():
                kl_policy_logps = sequence_logps(
                    policy, mismatched, pad, runtime
                )  # (B,) z0 is detached anyway
                ref_logps = sequence_logps(reference, matched, pad, runtime)  # (B,)
                kl_ref_logps = sequence_logps(reference, mismatched, pad, runtime)  # (B,)
            desirable = torch.tensor([r.label for r in chunk], device=runtime.device)  # (B,)
            loss, step_metrics = kto(
                policy_logps, ref_logps, kl_policy_logps, kl_ref_logps, desirable,
                config.beta, config.desirable_weight, config.undesirable_weight,
            )  # fmt: skip
            optimizer_step(policy, optimizer, loss, config.max_grad_norm)
            steps += 1
            batches.set_postfix(loss=f"{loss.item():.4f}", kl=f"{step_metrics['kto/kl']:.3f}")
        metrics["train/loss_last"] = loss.item()

    # 4. Held-out gaps after, then the folder the policy service loads.
    if held_out:
        metrics |= {
            f"eval/{k}_after": v
            for k, v in held_out_gaps(
                policy, reference, tokenizer, held_out, config, runtime
            ).items()
        }
    summary = build_summary("kto", config, metrics, provenance, started, steps)
    save_model_folder(config.output, policy.eval(), tokenizer, summary, config.overwrite)
    return summary
