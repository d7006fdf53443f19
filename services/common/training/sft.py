"""`rlhf sft`: supervised fine-tuning of a causal LM on demonstrations, loss on completion tokens.

    python -m services.cli sft --model models/smollm2-135m-instruct --data demos.jsonl \
        --output runs/sft-1 [--eval-data held_out.jsonl] [--config sft.yaml]

Data: `prompt`/`completion` or chat `messages` (data.py). Reports the held-out loss (mean
negative log-likelihood per completion token) before and after training.

Shapes: `B` batch, `T` tokens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.common.training.data import DataError, DataKind
from services.common.training.encoding import (
    EncodedCompletion,
    collate_completions,
    encode_completion,
)
from services.common.training.losses import LossName, get_loss, token_logprobs
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
class SFTConfig(StageConfig):
    learning_rate: float = 2e-5
    """AdamW learning rate (constant)."""


def encode_records(
    tokenizer, records: list, max_length: int, source: str
) -> list[EncodedCompletion]:
    encoded = []
    for index, record in enumerate(records):
        try:
            encoded.append(
                encode_completion(tokenizer, record.prompt, record.completion, max_length)
            )
        except ValueError as err:
            raise DataError(f"{source} record {index + 1}: {err}") from err
    return encoded


def completion_nll(model, batch, runtime: Runtime) -> tuple[torch.Tensor, dict]:
    """The SFT loss of one batch (mean NLL per completion token) and its metrics."""
    with runtime.autocast():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits  # (B, T, V)
    per_token = token_logprobs(logits, batch.input_ids)  # (B, T-1)
    return get_loss(LossName.SFT)(per_token, batch.completion_mask[:, 1:])


@torch.no_grad()
def held_out_loss(
    model,
    encoded: list[EncodedCompletion],
    pad_token_id: int,
    config: StageConfig,
    runtime: Runtime,
) -> float:
    """Mean NLL per completion token over the whole held-out set (token-weighted)."""
    model.eval()
    total, tokens = 0.0, 0.0
    for chunk in progress(
        in_batches(encoded, config.batch_size), "sft eval", -(-len(encoded) // config.batch_size)
    ):
        batch = collate_completions(chunk, pad_token_id).to(runtime.device)
        loss, metrics = completion_nll(model, batch, runtime)
        total += loss.item() * metrics["sft/tokens"]
        tokens += metrics["sft/tokens"]
    model.train()
    return total / max(tokens, 1.0)


def run_sft(config: SFTConfig) -> dict:
    config.validate()
    started = time.time()
    runtime = make_runtime(config)
    rng = random.Random(config.seed)

    # 1. Data: demonstrations, tokenized once; the completion mask marks what carries the loss.
    train, held_out, provenance = load_split(config, DataKind.DEMONSTRATION)
    tokenizer = load_tokenizer(config.model)
    train_encoded = encode_records(tokenizer, train, config.max_length, str(config.data))
    eval_encoded = encode_records(
        tokenizer, held_out, config.max_length, str(config.eval_data or config.data)
    )

    # 2. Model: float32 weights; forward under bf16 autocast on CUDA.
    model = load_causal_lm(config.model, runtime.device, torch.float32).train()
    optimizer = make_optimizer(model, config)
    metrics: dict[str, float] = {}
    if eval_encoded:
        metrics["eval/loss_before"] = held_out_loss(
            model, eval_encoded, tokenizer.pad_token_id, config, runtime
        )

    # 3. Train: mean NLL over completion tokens, one optimizer step a batch.
    steps = 0
    for epoch in range(config.epochs):
        batches = progress(
            shuffled_batches(train_encoded, config.batch_size, rng),
            f"sft epoch {epoch + 1}/{config.epochs}",
        )
        for chunk in batches:
            batch = collate_completions(chunk, tokenizer.pad_token_id).to(runtime.device)
            loss, step_metrics = completion_nll(model, batch, runtime)
            step_metrics["train/grad_norm"] = optimizer_step(
                model, optimizer, loss, config.max_grad_norm
            )
            steps += 1
            batches.set_postfix(loss=f"{step_metrics['sft/loss']:.4f}")
        metrics["train/loss_last"] = step_metrics["sft/loss"]

    # 4. Held-out loss after, then the folder the services load.
    if eval_encoded:
        metrics["eval/loss_after"] = held_out_loss(
            model, eval_encoded, tokenizer.pad_token_id, config, runtime
        )
    summary = build_summary("sft", config, metrics, provenance, started, steps)
    save_model_folder(config.output, model, tokenizer, summary, config.overwrite)
    return summary
