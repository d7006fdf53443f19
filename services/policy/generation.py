"""The batched decoding loop the policy runs inside Triton: the rows Triton's dynamic batcher
grouped are generated together in one forward loop with a KV cache.

Rows have prompts of different lengths (left-padded, positions counted from each row's first
real token), their own sampling parameters, seeds, logit bias and penalties (over the tokens
the row generated, services.policy.sampling), and their own stop conditions (end of sequence,
max_new_tokens, stop strings, cancellation); a finished row keeps its slot until the whole batch
is done (it is fed its last token and its output ignored), as `generate` does.

Legend: `B` rows, `P` longest prompt, `V` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from services.genproto.rlhf.v1 import common_pb2
from services.policy.sampling import (
    LogitAdjustments,
    RowSampling,
    draw,
    first_stop_string,
    log_distribution,
    row_generators,
    top_alternatives,
)


class Finish(IntEnum):
    """rlhf.v1.FinishReason by short names, with the proto's values; NONE (the proto's
    UNSPECIFIED) while the row is still generating."""

    NONE = common_pb2.FINISH_REASON_UNSPECIFIED
    STOP = common_pb2.FINISH_REASON_STOP
    LENGTH = common_pb2.FINISH_REASON_LENGTH
    STOP_STRING = common_pb2.FINISH_REASON_STOP_STRING
    CANCELLED = common_pb2.FINISH_REASON_CANCELLED


@dataclass
class Row:
    """One sequence to generate: one sample of one prompt."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: RowSampling
    stop: list[str] = field(default_factory=list)
    """Stop strings; the row finishes when one appears in its decoded output."""
    tokens: list[int] = field(default_factory=list)
    """Generated so far (the end-of-sequence token included when it ends the row)."""
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    """Per generated token, the best `sampling.top_logprobs` tokens of its distribution."""
    top_logprobs: list[list[float]] = field(default_factory=list)
    finish: Finish = Finish.NONE
    weights_version: int = 0
    """The weights version that generated every token of the row (continuous scheduler)."""
    batch_size: int = 0
    """Most rows this row was decoded together with, itself included (continuous scheduler)."""


OnToken = Callable[[int, int, float, Finish], None]
"""(row index, token, log-prob, finish reason after it) for every generated token; the row's
`top_ids[-1]` and `top_logprobs[-1]` are that token's alternatives."""


def left_pad(
    rows: list[Row], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (input_ids (B, P), attention_mask (B, P)), prompts right-aligned."""
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - len(r.prompt_ids) :] = 1
    return ids.to(device), mask.to(device)


def finish_of(
    row: Row, token: int, eos_ids: set[int], decode: Callable[[list[int]], str]
) -> Finish:
    if token in eos_ids:
        return Finish.STOP
    if row.stop and first_stop_string(decode(row.tokens), row.stop) >= 0:
        return Finish.STOP_STRING
    if len(row.tokens) >= row.max_new_tokens:
        return Finish.LENGTH
    return Finish.NONE


@torch.inference_mode()
def generate_rows(
    model,
    rows: list[Row],
    pad_id: int,
    eos_ids: set[int],
    decode: Callable[[list[int]], str],
    on_token: OnToken | None = None,
    cancelled: Callable[[int], bool] = lambda i: False,
    on_step: Callable[[int], None] = lambda produced: None,
) -> list[Row]:
    """Generates every row to its end; fills `tokens`, `logprobs` and `finish` in place.

    `cancelled(i)` is asked before every step for every running row; a cancelled row stops at
    once (Finish.CANCELLED), and when all rows are done the loop ends. `on_step(k)` is told
    after every step how many tokens it produced.
    """
    device = next(model.parameters()).device
    ids, mask = left_pad(rows, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    temperature = torch.tensor([r.sampling.temperature for r in rows], device=device)
    top_p = torch.tensor([r.sampling.top_p for r in rows], device=device)
    top_k = torch.tensor([r.sampling.top_k for r in rows], device=device)
    generators = row_generators([r.sampling for r in rows], device)
    top_counts = [r.sampling.top_logprobs for r in rows]

    # Prefill: only the last position's logits are needed (the LM head over every prompt position
    # would cost B x P x V for nothing, about a fifth of a short prompt's prefill).
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    cache, logits = out.past_key_values, out.logits[:, -1, :]  # (B, V)
    adjustments = LogitAdjustments([r.sampling for r in rows], logits.shape[-1], device)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    steps = max(r.max_new_tokens for r in rows)
    for _ in range(steps):
        for i, r in enumerate(rows):
            if r.finish == Finish.NONE and cancelled(i):
                r.finish = Finish.CANCELLED
        running = [i for i, r in enumerate(rows) if r.finish == Finish.NONE]
        if not running:
            break
        # The same steps in the unary and the streaming path: adjust, filter, draw.
        dist = log_distribution(adjustments.apply(logits.float()), temperature, top_k, top_p)
        tokens = draw(dist, temperature, generators)  # (B,)
        logprobs = dist.gather(-1, tokens[:, None]).squeeze(-1)  # (B,)
        adjustments.record(tokens, running)
        alternatives = top_alternatives(dist, top_counts) if any(top_counts) else None
        tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
        for i in running:
            r = rows[i]
            r.tokens.append(tokens_list[i])
            r.logprobs.append(logprobs_list[i])
            if alternatives is not None:
                r.top_ids.append(alternatives[i][0])
                r.top_logprobs.append(alternatives[i][1])
            r.finish = finish_of(r, tokens_list[i], eos_ids, decode)
            if on_token is not None:
                on_token(i, tokens_list[i], logprobs_list[i], r.finish)
        on_step(len(running))
        if all(r.finish != Finish.NONE for r in rows):
            break
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)  # (B, P + t)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = next_pos + 1
    return rows
