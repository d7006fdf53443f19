"""Text -> token ids for the offline stages, and the reward model's one input encoding.

Causal LM stages (sft, dpo, kto) see `prompt + completion` as one token sequence and take their
loss on the completion tokens only:
- plain strings: the prompt is tokenized with the tokenizer's special tokens, the completion
  without them, and the EOS token is appended so the model learns to stop;
- chat message lists: rendered through the tokenizer's chat template; the completion is what the
  full conversation adds after the prompt rendered with `add_generation_prompt=True` (the final
  assistant turn, including its end-of-turn token).
Too long: the prompt loses tokens from the left first, the completion from the right last.

The reward model scores (prompt, response) through `encode_for_reward`: the reward service must
call the same function so that training and serving see identical tokens.

Shapes: `B` batch, `T` tokens of prompt and completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.training.data import Text
from services.common.training.losses import token_logprobs


@dataclass(frozen=True)
class EncodedCompletion:
    input_ids: list[int]
    """Prompt tokens then completion tokens."""
    completion_start: int
    """Index of the first completion token in `input_ids`."""


@dataclass(frozen=True)
class CompletionBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens (the ones with a loss)

    def to(self, device: torch.device) -> CompletionBatch:
        return CompletionBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion_mask))
        )


def render_chat(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
    """(prompt text ending with the assistant header, the completion text that follows it)."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template does not render the prompt as a prefix of the conversation; "
            "use plain prompt/completion strings with this tokenizer"
        )
    return prompt_text, full_text[len(prompt_text) :]


def encode_completion(
    tokenizer, prompt: Text, completion: Text, max_length: int
) -> EncodedCompletion:
    """Token ids of prompt + completion and where the completion starts (see module docstring)."""
    if isinstance(prompt, list):
        prompt_text, completion_text = render_chat(tokenizer, prompt, completion)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    completion_ids = completion_ids[
        : max_length - 1
    ]  # keep at least one prompt token to predict from
    prompt_ids = prompt_ids[-(max_length - len(completion_ids)) :]
    return EncodedCompletion(
        input_ids=prompt_ids + completion_ids, completion_start=len(prompt_ids)
    )


def collate_completions(encoded: list[EncodedCompletion], pad_token_id: int) -> CompletionBatch:
    """Right-padded tensors; padding is marked by the masks, never by comparing with a pad id."""
    longest = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), longest), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((len(encoded), longest), dtype=torch.long)  # (B, T)
    for row, e in enumerate(encoded):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, : len(e.input_ids)] = 1
        completion_mask[row, e.completion_start : len(e.input_ids)] = 1
    return CompletionBatch(input_ids, attention_mask, completion_mask)


def completion_logprobs(model, batch: CompletionBatch) -> torch.Tensor:
    """Summed log-probability of each completion under `model`: (B,), in float32."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).logits  # (B, T, V)
    per_token = token_logprobs(logits, batch.input_ids)  # (B, T-1)
    return (per_token * batch.completion_mask[:, 1:]).sum(dim=-1)  # (B,)


# ---------------------------------------------------------------------------------------------
# Reward model input


def encode_for_reward(
    tokenizer, prompt: str, response: str, max_length: int
) -> dict[str, list[int]]:
    """The reward model's input for one (prompt, response): the two as a text pair.

    For BERT-style tokenizers this is `[CLS] prompt [SEP] response [SEP]` with segment ids 0/1;
    when too long, tokens go from the longer of the two first. Training and the reward service
    both call this function, so a response is scored on exactly the tokens it was trained on.
    """
    encoded = tokenizer(prompt, response, truncation="longest_first", max_length=max_length)
    return {name: list(ids) for name, ids in encoded.items()}


def reward_batch(
    tokenizer, prompts: list[str], responses: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """`encode_for_reward` for many pairs, padded into (B, T) tensors for the model's forward."""
    rows = [
        encode_for_reward(tokenizer, p, r, max_length)
        for p, r in zip(prompts, responses, strict=True)
    ]
    return dict(tokenizer.pad(rows, padding=True, return_tensors="pt"))
