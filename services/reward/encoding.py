"""What the reward model reads: a prompt rendered as text, then the (prompt, response) encoding.

- The prompt is rendered by services.common.prompts: plain text as it is, a single user turn as
  its content, any other conversation as "role: content" lines. The reward model is a text-pair
  encoder with no chat template of its own, and this rendering does not depend on the policy's
  tokenizer, so the same conversation always scores the same whatever policy produced it, and
  the same as the rankings and thumbs it was trained on.
- The pair encoding is the reward-model trainer's own `encode_for_reward` /`reward_batch`
  (services.common.training.encoding): serving and training see identical tokens, truncation
  (longest first, to `max_length` tokens) included.
"""

from __future__ import annotations

from services.common.prompts import render_messages, render_prompt
from services.common.training.encoding import encode_for_reward, reward_batch

__all__ = ["encode_for_reward", "render_messages", "render_prompt", "reward_batch"]
