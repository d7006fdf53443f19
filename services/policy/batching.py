"""The running batch of the continuous scheduler (services.policy.scheduler): rows join it at a
step boundary and leave it the step they finish, each with its own slice of one KV cache, its
own positions and its own sampling state.

How rows of different lengths share one forward pass:
1. Joining rows are prefilled together (left-padded, positions counted from each row's first
   real token, as in services.policy.generation), only their last position's logits kept.
2. Their cache is merged into the running one: whichever is narrower is left-padded with zero
   keys/values and attention mask 0, so every row's tokens stay right-aligned (W columns).
3. A decoding step samples one token per row from its pending logits (adjust, filter, draw:
   services.policy.sampling, each row with its own seeded generator), emits it, drops the rows
   that finished, and runs the survivors' tokens through the model with per-row positions.
4. After rows leave, the left columns no remaining row uses are cut off.
Padding is masked out and positions are per row, so a row's numbers do not depend on the other
rows beyond float rounding in the batched matmuls (tests: tokens equal, log-probs to 1e-4).

Shared prefix: joining rows with the same prompt ids are prefilled once and their cache, logits
and positions copied per row; each copy keeps its own generator, so a sample's tokens are the
ones it gets when prefilled alone.

Legend: `B` rows running, `W` cache columns, `U` distinct prompts joining, `V` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from services.policy.generation import Finish, Row, finish_of, left_pad
from services.policy.sampling import (
    LogitAdjustments,
    draw,
    log_distribution,
    row_generators,
    top_alternatives,
)

OnToken = Callable[[Any, Row, int, float, Finish], None]
"""(handle, row, token, log-prob, finish after it) for every generated token; `row.top_ids[-1]`
and `row.top_logprobs[-1]` are that token's alternatives."""


class RunningBatch:
    """The rows decoding together, their KV cache and their pending logits."""

    def __init__(
        self,
        model,
        pad_id: int,
        eos_ids: set[int],
        decode: Callable[[list[int]], str],
        share_prefix: bool = True,
    ):
        self.model = model
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.decode = decode
        self.share_prefix = share_prefix
        self.device = next(model.parameters()).device
        self.clear()

    def clear(self) -> None:
        """Forgets every row (after a failed step, whose rows were all answered with the error)."""
        self.rows: list[Row] = []
        self.handles: list[Any] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, W)
        self.next_pos: torch.Tensor | None = None  # (B, 1)
        self.logits: torch.Tensor | None = None  # (B, V) for each row's next token
        self.temperature = self.top_p = self.top_k = None  # (B,)
        self.generators: list[torch.Generator] = []
        self.adjustments: LogitAdjustments | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def reserved_tokens(self) -> int:
        """KV-cache tokens the running rows may grow to (prompt + max_new_tokens each)."""
        return sum(len(r.prompt_ids) + r.max_new_tokens for r in self.rows)

    # Joining ------------------------------------------------------------------------------

    @torch.inference_mode()
    def join(self, rows: list[Row], handles: list[Any]) -> None:
        """Prefills `rows` and adds them to the batch (steps 1 and 2 of the module docstring)."""
        if not rows:
            return
        first: dict[tuple[int, ...], int] = {}
        source = []  # joining row -> the prefilled row it copies
        for i, r in enumerate(rows):
            key = tuple(r.prompt_ids) if self.share_prefix else (i,)
            source.append(first.setdefault(key, len(first)))
        distinct = [rows[source.index(u)] for u in range(len(first))]
        ids, mask = left_pad(distinct, self.pad_id, self.device)  # (U, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        index = torch.tensor(source, device=self.device)
        cache = out.past_key_values
        if len(distinct) != len(rows):  # copies of a shared prefix: one cache slice per sample
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        logits = out.logits[:, -1, :][index]  # (b, V)
        mask, next_pos = mask[index], positions[:, -1:][index] + 1
        samplings = [r.sampling for r in rows]
        adjustments = LogitAdjustments(samplings, logits.shape[-1], self.device)
        temperature = torch.tensor([s.temperature for s in samplings], device=self.device)
        top_p = torch.tensor([s.top_p for s in samplings], device=self.device)
        top_k = torch.tensor([s.top_k for s in samplings], device=self.device)
        generators = row_generators(samplings, self.device)
        if not self.rows:
            self.cache, self.mask, self.next_pos, self.logits = cache, mask, next_pos, logits
            self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
            self.adjustments = adjustments
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            self.mask = torch.cat(
                [
                    F.pad(self.mask, (width - self.mask.shape[1], 0)),
                    F.pad(mask, (width - mask.shape[1], 0)),
                ]
            )
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.logits = torch.cat([self.logits, logits])
            self.temperature = torch.cat([self.temperature, temperature])
            self.top_p = torch.cat([self.top_p, top_p])
            self.top_k = torch.cat([self.top_k, top_k])
            self.adjustments = self.adjustments.concat(adjustments)
        self.generators += generators
        self.rows += rows
        self.handles += handles

    # Decoding -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(
        self, cancelled: Callable[[Any], bool], on_token: OnToken | None = None
    ) -> list[tuple[Any, Row]]:
        """One token for every row (step 3); returns the (handle, row) pairs that finished,
        cancelled ones included, which have left the batch."""
        gone = []
        for h, r in zip(self.handles, self.rows):
            if cancelled(h):
                r.finish = Finish.CANCELLED
                gone.append((h, r))
        if gone:
            self._retain([i for i, r in enumerate(self.rows) if r.finish == Finish.NONE])
        if not self.rows:
            return gone
        batch = len(self.rows)
        dist = log_distribution(
            self.adjustments.apply(self.logits.float()), self.temperature, self.top_k, self.top_p
        )  # (B, V)
        tokens = draw(dist, self.temperature, self.generators)  # (B,)
        logprobs = dist.gather(-1, tokens[:, None]).squeeze(-1)  # (B,)
        self.adjustments.record(tokens, list(range(batch)))
        counts = [r.sampling.top_logprobs for r in self.rows]
        alternatives = top_alternatives(dist, counts) if any(counts) else None
        tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
        for i, (h, r) in enumerate(zip(self.handles, self.rows)):
            r.tokens.append(tokens_list[i])
            r.logprobs.append(logprobs_list[i])
            if alternatives is not None:
                r.top_ids.append(alternatives[i][0])
                r.top_logprobs.append(alternatives[i][1])
            r.batch_size = max(r.batch_size, batch)
            r.finish = finish_of(r, tokens_list[i], self.eos_ids, self.decode)
            if on_token is not None:
                on_token(h, r, tokens_list[i], logprobs_list[i], r.finish)
        survivors = [i for i, r in enumerate(self.rows) if r.finish == Finish.NONE]
        gone += [(self.handles[i], r) for i, r in enumerate(self.rows) if r.finish != Finish.NONE]
        tokens = tokens[survivors] if len(survivors) != batch else tokens
        self._retain(survivors)
        if self.rows:
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=-1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=self.mask,
                position_ids=self.next_pos,
                past_key_values=self.cache,
                use_cache=True,
            )
            self.cache, self.logits = out.past_key_values, out.logits[:, -1, :]
            self.next_pos = self.next_pos + 1
        return gone

    def _retain(self, keep: list[int]) -> None:
        """Keeps rows `keep` (in order) and cuts the cache columns none of them uses (step 4)."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        start = int(mask.any(0).long().argmax())  # the first column a remaining row uses
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask = mask[:, start:]
        self.next_pos, self.logits = self.next_pos[index], self.logits[index]
        self.temperature, self.top_p = self.temperature[index], self.top_p[index]
        self.top_k = self.top_k[index]
        self.adjustments = self.adjustments.select(index)
        self.generators = [self.generators[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        self.handles = [self.handles[i] for i in keep]


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """Cache states (B, H, w, D) left-padded with zeros to (B, H, width, D)."""
    return F.pad(states, (0, 0, width - states.shape[-2], 0))
