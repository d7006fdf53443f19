"""Per-token log-probs of response tokens under a causal LM, for a batch of different lengths.

A pure function of (model, sequences): the Triton model runs it on whatever the dynamic batcher
grouped, and tests compare it with the obvious unpadded computation.

Sequences are LEFT-padded into one forward pass, with an attention mask that hides the padding
and position ids that restart at 0 where each sequence really starts, so every real token sees
exactly the context and positions it has unpadded. Left padding lines the response ends up on the
right, so the model only has to project the last `A_max + 1` hidden states to the vocabulary
(`logits_to_keep`), not all `T` of them.

Legend: B sequences, T padded total tokens (prompt + response), A response tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ScoredSequence:
    """One prompt and the response whose tokens get log-probs."""

    prompt_ids: np.ndarray
    """Prompt token ids, (P,), P >= 1."""
    response_ids: np.ndarray
    """Response token ids, (A,), A >= 1."""


def left_pad(
    sequences: list[ScoredSequence], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask and position ids, each (B, T), real tokens on the right."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
    T = max(lengths)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)  # (B, T)
    for i, (s, n) in enumerate(zip(sequences, lengths)):
        ids[i, T - n :] = torch.from_numpy(
            np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64)
        )
        mask[i, T - n :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): 0 at each real first token
    return ids, mask, positions


@torch.inference_mode()
def response_logprobs(
    model, sequences: list[ScoredSequence], device: torch.device
) -> list[np.ndarray]:
    """log p(response[j] | prompt, response[:j]) for every sequence; float32 arrays of shape (A_i,)."""
    if not sequences:
        return []
    ids, mask, positions = left_pad(sequences)
    a_max = max(len(s.response_ids) for s in sequences)
    # Logits at position t predict token t+1: the response's A tokens are predicted by the A
    # positions before the last one, so keep the last A_max + 1 positions and drop the final one.
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=a_max + 1,
    ).logits[:, :-1]  # (B, A_max, V)
    targets = ids[:, -a_max:].to(device)  # (B, A_max): the tokens those positions predict
    logprobs = (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    )
    logprobs = logprobs.cpu().numpy()  # (B, A_max), right-aligned
    return [logprobs[i, a_max - len(s.response_ids) :].copy() for i, s in enumerate(sequences)]
