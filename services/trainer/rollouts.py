"""Rollouts in, tensors out: the learner's input types, their collation into padded tensors,
and per-token log-probs of responses under a model. (In-process sampling of scored rollouts,
for learning tests and benchmarks, is tests/support/rollouts.py.)

Legend: `B` batch, `P` prompt tokens (left-padded), `A` response tokens (right-padded),
`T` = P + A all tokens, `V` vocabulary, `H` hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass
class RolloutSample:
    """One scored sample, as a `rlhf.v1.Rollout` carries it (plain Python values)."""

    prompt_token_ids: list[int]
    """The prompt as the policy saw it (chat template applied)."""
    response_token_ids: list[int]
    """The sampled response, EOS included when the policy stopped by itself."""
    behaviour_logprobs: list[float]
    """Log-prob of each response token under the policy that generated it."""
    reference_logprobs: list[float]
    """Log-prob of each response token under the frozen reference model."""
    reward: float
    """The reward model's score of the whole response."""
    group_id: str
    """Samples of the same prompt share it (the GRPO/RLOO baseline group)."""
    weights_version: int = 0
    """Policy weights version that generated the sample."""
    rollout_id: str = ""
    """Unique id of the rollout (de-duplication happens upstream, in the Kafka trainer)."""
    reward_spread: float = 0.0
    """The reward ensemble's standard deviation for this sample (0 with one head)."""
    gold_score: float | None = None
    """An independent gold annotator's score, reported beside the reward; never trained on."""

    def validate(self) -> None:
        """Raises ValueError saying what is wrong with this sample."""
        name = self.rollout_id or "rollout"
        if not self.prompt_token_ids or not self.response_token_ids:
            raise ValueError(f"{name}: prompt and response need at least one token each")
        n = len(self.response_token_ids)
        if len(self.behaviour_logprobs) != n or len(self.reference_logprobs) != n:
            raise ValueError(
                f"{name}: {n} response tokens but {len(self.behaviour_logprobs)} behaviour and "
                f"{len(self.reference_logprobs)} reference log-probs"
            )
        if min(self.prompt_token_ids) < 0 or min(self.response_token_ids) < 0:
            raise ValueError(f"{name}: negative token id")
        if not math.isfinite(self.reward):
            raise ValueError(f"{name}: reward {self.reward} is not finite")
        if not (math.isfinite(self.reward_spread) and self.reward_spread >= 0):
            raise ValueError(f"{name}: reward spread {self.reward_spread} must be finite and >= 0")
        if self.gold_score is not None and not math.isfinite(self.gold_score):
            raise ValueError(f"{name}: gold score {self.gold_score} is not finite")
        for label, values in (
            ("behaviour", self.behaviour_logprobs),
            ("reference", self.reference_logprobs),
        ):
            if not all(math.isfinite(v) and v <= 1e-4 for v in values):
                raise ValueError(f"{name}: {label} log-probs must be finite and <= 0")


@dataclass
class RolloutBatch:
    """A padded batch: prompts left-padded to P, responses right-padded to A."""

    input_ids: torch.Tensor  # (B, T) long, T = P + A
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    position_ids: torch.Tensor  # (B, T) long, counted from each row's first real token
    response_ids: torch.Tensor  # (B, A) long, pad_id on padding
    response_mask: torch.Tensor  # (B, A) float32, 1.0 on response tokens
    behaviour_logprobs: torch.Tensor  # (B, A) float32, 0 on padding
    reference_logprobs: torch.Tensor  # (B, A) float32, 0 on padding
    scores: torch.Tensor  # (B,) float32, the reward model's score
    reward_spreads: torch.Tensor  # (B,) float32, the reward ensemble's spread (0: one head)
    gold_scores: torch.Tensor  # (B,) float32, the gold annotator's score, NaN where none
    group_index: torch.Tensor  # (B,) long, the group of each sample, numbered from 0
    weights_version: torch.Tensor  # (B,) long

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def collate(samples: list[RolloutSample], pad_id: int) -> RolloutBatch:
    """Validates the samples and pads them into one `RolloutBatch` (shapes on its fields)."""
    if not samples:
        raise ValueError("collate needs at least one rollout")
    for sample in samples:
        sample.validate()
    B = len(samples)
    P = max(len(s.prompt_token_ids) for s in samples)
    A = max(len(s.response_token_ids) for s in samples)
    input_ids = torch.full((B, P + A), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + A), dtype=torch.long)
    behaviour = torch.zeros((B, A), dtype=torch.float32)
    reference = torch.zeros((B, A), dtype=torch.float32)
    groups: dict[str, int] = {}
    for i, s in enumerate(samples):
        p, a = len(s.prompt_token_ids), len(s.response_token_ids)
        input_ids[i, P - p : P] = torch.tensor(s.prompt_token_ids)
        input_ids[i, P : P + a] = torch.tensor(s.response_token_ids)
        attention_mask[i, P - p : P + a] = 1
        behaviour[i, :a] = torch.tensor(s.behaviour_logprobs)
        reference[i, :a] = torch.tensor(s.reference_logprobs)
        groups.setdefault(s.group_id, len(groups))
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        response_ids=input_ids[:, P:].clone(),
        response_mask=attention_mask[:, P:].float(),
        behaviour_logprobs=behaviour,
        reference_logprobs=reference,
        scores=torch.tensor([float(s.reward) for s in samples], dtype=torch.float32),
        reward_spreads=torch.tensor([float(s.reward_spread) for s in samples], dtype=torch.float32),
        gold_scores=torch.tensor(
            [math.nan if s.gold_score is None else float(s.gold_score) for s in samples],
            dtype=torch.float32,
        ),
        group_index=torch.tensor([groups[s.group_id] for s in samples], dtype=torch.long),
        weights_version=torch.tensor([int(s.weights_version) for s in samples], dtype=torch.long),
    )


def sequence_logits(model, batch: RolloutBatch, need_hidden: bool = False):
    """Logits that predict each response token (b, A, V) and, optionally, the last hidden
    state at the same positions (b, A, H): position P-1+j predicts response token j."""
    A = batch.response_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        output_hidden_states=need_hidden,
        logits_to_keep=A + 1,  # positions P-1 .. T-1; the last one predicts nothing we sampled
    )
    logits = out.logits[:, :-1]  # (b, A, V)
    hidden = out.hidden_states[-1][:, -(A + 1) : -1] if need_hidden else None  # (b, A, H)
    return logits, hidden


def response_logprobs(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the response tokens under `model`: (B, A), 0 on padding."""
    logits, _ = sequence_logits(model, batch)
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, A, V)
    return logprobs.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * batch.response_mask
